"""Copy prepared snapshot weights into a served model in place: one copy per tensor, on one torch thread."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from firetitan.checkpoints.parallel import one_torch_thread
from firetitan.errors import SnapshotError


def copy_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """`model.load_state_dict(state_dict, strict=False)` for weights already checked against the model's
    layout (`SnapshotLoader._checked`), as plain in-place copies (casting where the dtypes differ).

    One thread: the copy is memory-bound, and a second torch thread on a loaded machine made it 5-18x
    slower here (see `parallel.one_torch_thread`). Tied weights are one tensor in the model, copied once.
    """
    own = model.state_dict(keep_vars=True)
    done: set[int] = set()
    with torch.no_grad(), one_torch_thread():
        for name, src in state_dict.items():
            dst = own.get(name)
            if dst is None:
                raise SnapshotError(f"weight {name!r} is not in the served model")
            key = dst.data_ptr()
            if key in done:
                continue
            done.add(key)
            dst.copy_(src)
