"""Group-relative advantages (GRPO): each sample's reward minus its group's mean, optionally scaled."""

from __future__ import annotations

import math
from collections.abc import Sequence


def group_advantages(rewards: Sequence[float], *, normalize_std: bool = False, eps: float = 1e-6) -> list[float]:
    """Reward minus the group mean; with `normalize_std`, also divided by the group's std (+eps).

    A group whose rewards are all equal carries no signal and gets all-zero advantages.
    """
    if not rewards:
        return []
    mean = sum(rewards) / len(rewards)
    centered = [float(r) - mean for r in rewards]
    if not normalize_std:
        return centered
    std = math.sqrt(sum(c * c for c in centered) / len(centered))
    return [c / (std + eps) for c in centered]


def is_constant(rewards: Sequence[float], tol: float = 1e-9) -> bool:
    return not rewards or max(rewards) - min(rewards) <= tol
