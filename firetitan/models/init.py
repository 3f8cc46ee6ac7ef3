"""Deterministic weight initialisation for the built-in models, from a seed and a private generator."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

try:  # transformers >= 5
    from transformers.initialization import no_init_weights as _no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights as _no_init_weights

# `no_init_weights` patches torch.nn.init process-wide while a model is built; serialise our builds.
_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def skip_default_init() -> Iterator[None]:
    """Build modules without transformers' random init, so the global torch RNG is never drawn from."""
    with _BUILD_LOCK, _no_init_weights():
        yield


@torch.no_grad()
def init_weights_(model: nn.Module, seed: int, std: float) -> None:
    """Overwrite every parameter in place: matrices ~ N(0, std), norm scales 1, biases 0.

    Parameters are visited in sorted-name order and drawn from one local `torch.Generator` in float32,
    then cast, so the same (architecture, seed) gives bit-identical weights in every process and dtype
    rounding is the only difference between dtypes.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.ndim >= 2:
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
            param.copy_(values.to(device=param.device, dtype=param.dtype))
        elif name.endswith("bias"):
            param.zero_()
        else:  # 1-D weights in this architecture are RMSNorm scales
            param.fill_(1.0)
