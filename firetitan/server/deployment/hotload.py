"""Hot-load: read, verify and prepare snapshot weights off the engine thread; track loading state."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file

from firetitan.checkpoints import SnapshotStore
from firetitan.errors import ConflictError, SnapshotError


@dataclass
class PreparedWeights:
    """A full state dict ready to copy into the model, and what it is."""

    identity: str
    kind: str  # base | delta | lora
    state_dict: dict[str, torch.Tensor]
    base_identity: str | None  # the base this leaves loaded (deltas and LoRA keep the previous one)


@dataclass
class LoadingState:
    """What GET /hot_load reports about the latest load (Fireworks `loading_state` shape)."""

    stage: str = "idle"  # idle | loading | swapping | done | error
    identity: str | None = None
    mode: str | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "identity": self.identity, "mode": self.mode, "error": self.error,
                "started_at": self.started_at, "finished_at": self.finished_at}


@dataclass
class HotLoadState:
    """Which snapshot is served, which base deltas must apply to, and the base weights kept for them."""

    base_model: str
    current_identity: str | None = None
    base_identity: str | None = None
    base_state_dict: dict[str, torch.Tensor] | None = None
    loaded_adapters: list[dict[str, Any]] = field(default_factory=list)
    loading: LoadingState = field(default_factory=LoadingState)
    history: list[dict[str, Any]] = field(default_factory=list)


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class SnapshotLoader:
    """Turns a snapshot identity into a full state dict for the served model (runs in a worker thread).

    `served` is the reference layout (names, shapes, dtypes) of the model's weights; `startup` the
    weights the deployment started with, which LoRA adapters are merged into.
    """

    def __init__(self, store: SnapshotStore, served: dict[str, torch.Tensor], startup: dict[str, torch.Tensor]) -> None:
        self.store = store
        self.layout = {k: (tuple(v.shape), v.dtype) for k, v in served.items()}
        self.startup = startup

    def check_chain(self, identity: str, previous: str | None, state: HotLoadState) -> str:
        """Refuse (409) a delta whose base is not the loaded one before reading any payload; returns kind."""
        manifest = self.store.manifest(identity)
        if manifest.kind == "delta":
            wanted = manifest.previous_snapshot_identity
            if previous is not None and previous != wanted:
                raise ConflictError(
                    f"incremental_snapshot_metadata.previous_snapshot_identity {previous!r} does not match "
                    f"the delta's base {wanted!r}", field="incremental_snapshot_metadata.previous_snapshot_identity")
            if state.base_identity != wanted:
                raise ConflictError(
                    f"delta {identity!r} applies to base {wanted!r}, but the loaded base is "
                    f"{state.base_identity!r}; hot-load that base first",
                    field="incremental_snapshot_metadata.previous_snapshot_identity")
        elif previous is not None:
            raise ConflictError(f"snapshot {identity!r} is a {manifest.kind} snapshot, not a delta; send "
                                "incremental_snapshot_metadata only for deltas",
                                field="incremental_snapshot_metadata")
        return manifest.kind

    def prepare(self, identity: str, state: HotLoadState) -> PreparedWeights:
        manifest = self.store.verify(identity)  # whole-file checksums first: a corrupt payload is refused
        if manifest.kind == "base":
            sd = self.store.load_state_dict(identity)
            return PreparedWeights(identity, "base", self._checked(sd, identity), identity)
        if manifest.kind == "delta":
            if state.base_state_dict is None:
                raise SnapshotError(f"delta {identity!r} needs its base loaded first")
            sd = self.store.load_state_dict(identity, state.base_state_dict, base_identity=state.base_identity)
            return PreparedWeights(identity, "delta", self._checked(sd, identity), state.base_identity)
        merged = self._merge_lora(identity)
        return PreparedWeights(identity, "lora", merged, state.base_identity)

    def _checked(self, sd: dict[str, torch.Tensor], identity: str) -> dict[str, torch.Tensor]:
        """Same names and shapes as the served model (tied aliases may be absent); cast dtypes."""
        unknown = sorted(set(sd) - set(self.layout))
        if unknown:
            raise SnapshotError(f"snapshot {identity!r} has weights the model lacks: {unknown[:3]}")
        missing = sorted(set(self.layout) - set(sd))
        if missing:
            raise SnapshotError(f"snapshot {identity!r} lacks weights: {missing[:3]}")
        out = {}
        for name, tensor in sd.items():
            shape, dtype = self.layout[name]
            if tuple(tensor.shape) != shape:
                raise SnapshotError(f"snapshot {identity!r}: {name} has shape {tuple(tensor.shape)}, model has {shape}")
            out[name] = tensor.to(dtype)
        return out

    def _merge_lora(self, identity: str) -> dict[str, torch.Tensor]:
        """Fold a PEFT LoRA adapter into a copy of the startup weights: W + scale * B @ A."""
        directory = self.store.lora_dir(identity)
        try:
            config = json.loads((directory / "adapter_config.json").read_text())
            adapter = load_file(str(directory / "adapter_model.safetensors"))
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"LoRA snapshot {identity!r} is unreadable: {exc}") from exc
        for flag in ("use_dora", "fan_in_fan_out"):
            if config.get(flag):
                raise SnapshotError(f"LoRA snapshot {identity!r} uses {flag}, which the deployment cannot merge")
        rank = int(config["r"])
        alpha = float(config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in adapter.items():
            match = _LORA_KEY.match(key)
            if match is None:
                raise SnapshotError(f"LoRA snapshot {identity!r} has an unsupported tensor {key!r}")
            pairs.setdefault(match["module"], {})[match["ab"]] = tensor
        merged = dict(self.startup)
        for module, ab in pairs.items():
            target = f"{module}.weight"
            if target not in merged or set(ab) != {"A", "B"}:
                raise SnapshotError(f"LoRA snapshot {identity!r}: no base weight for {module!r}")
            base = merged[target]
            update = (ab["B"].double() @ ab["A"].double()) * scale
            if update.shape != base.shape:
                raise SnapshotError(f"LoRA snapshot {identity!r}: {module} update shape {tuple(update.shape)}")
            merged[target] = (base.double() + update).to(base.dtype)
        return merged


def now() -> float:
    return time.time()
