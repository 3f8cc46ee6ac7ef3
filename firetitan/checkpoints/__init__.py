"""Checkpoints: sampler snapshots (base / delta / LoRA) for deployments and DCP train state for resume."""

from firetitan.checkpoints.identity import MAX_NAME_LENGTH, make_identity, new_client_suffix, validate_name
from firetitan.checkpoints.manifest import FORMAT_VERSION, SnapshotKind, SnapshotManifest
from firetitan.checkpoints.store import SnapshotStore
from firetitan.checkpoints.train_state import (
    TrainStateInfo,
    TrainStateStore,
    load_train_state,
    read_train_state_info,
    save_train_state,
)

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
