"""How the deployment holds weights: the startup weights LoRA merges need are re-read, never kept resident."""

from __future__ import annotations

import torch

from firetitan.models import load_model
from firetitan.server.deployment.backend import StartupWeights

NANO = "firetitan/nano-qwen3"


def test_startup_weights_equal_the_base_model_and_leave_nothing_resident() -> None:
    served = load_model(NANO)
    original = {k: v.clone() for k, v in served.state_dict().items()}
    weights = StartupWeights(NANO, list(original))
    with torch.no_grad():  # the served model drifts (a hot-load); the startup weights must not
        for p in served.parameters():
            p.add_(1.0)
    merged = dict(weights)  # what a LoRA merge reads
    assert merged.keys() == original.keys()
    assert all(torch.equal(merged[k], original[k]) for k in original)
    assert weights._pending is None  # every tensor was handed out once: no second copy stays alive
    again = weights["lm_head.weight"]  # a lone read works too and keeps nothing
    assert torch.equal(again, original["lm_head.weight"]) and weights._pending is None
    assert len(weights) == len(original) and "nope" not in weights
