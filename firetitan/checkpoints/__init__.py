"""Checkpoints: sampler snapshots (base / delta / LoRA) for deployments and DCP train state for resume."""

from firetitan._lazy import lazy_getattr
from firetitan.checkpoints.identity import MAX_NAME_LENGTH, make_identity, new_client_suffix, validate_name
from firetitan.checkpoints.manifest import FORMAT_VERSION, SnapshotKind, SnapshotManifest

# The store and train state need torch (seconds to import); names, identities and manifests do not.
# Those two load on first use, so the control plane can name snapshots without importing torch.
_LAZY = {
    "SnapshotStore": "store", "TrainStateInfo": "train_state", "TrainStateStore": "train_state",
    "load_train_state": "train_state", "read_train_state_info": "train_state", "save_train_state": "train_state",
}

__getattr__ = lazy_getattr("firetitan.checkpoints", _LAZY, globals())


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
