"""Checkpoints: sampler snapshots (base / delta / LoRA) for deployments and DCP train state for resume."""

from typing import Any

from firetitan.checkpoints.identity import MAX_NAME_LENGTH, make_identity, new_client_suffix, validate_name
from firetitan.checkpoints.manifest import FORMAT_VERSION, SnapshotKind, SnapshotManifest

# The store and train state need torch (seconds to import); names, identities and manifests do not.
# Those two load on first use, so the control plane can name snapshots without importing torch.
_LAZY = {
    "SnapshotStore": "store", "TrainStateInfo": "train_state", "TrainStateStore": "train_state",
    "load_train_state": "train_state", "read_train_state_info": "train_state", "save_train_state": "train_state",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'firetitan.checkpoints' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"firetitan.checkpoints.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "FORMAT_VERSION",
    "MAX_NAME_LENGTH",
    "SnapshotKind",
    "SnapshotManifest",
    "SnapshotStore",
    "TrainStateInfo",
    "TrainStateStore",
    "load_train_state",
    "make_identity",
    "new_client_suffix",
    "read_train_state_info",
    "save_train_state",
    "validate_name",
]
