"""The `manifest.json` model written beside every sampler snapshot's payload."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"

SnapshotKind = Literal["base", "delta", "lora"]


class SnapshotManifest(BaseModel):
    """What a snapshot is, what it applies to, and the digests that prove its payload is intact.

    `checksum` is the sha256 of the sorted `"<file> <sha256>"` lines of `files`, so one string names
    the whole payload; `files` keeps the per-file digests so `verify` can say which file is bad.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    format_version: int = FORMAT_VERSION
    identity: str
    name: str | None = None
    kind: SnapshotKind
    base_model: str | None = None
    previous_snapshot_identity: str | None = Field(
        default=None, description="For a delta: the identity of the base snapshot it applies to."
    )
    previous_snapshot_checksum: str | None = Field(
        default=None, description="For a delta: the `checksum` of that base snapshot."
    )
    checksum: str
    files: dict[str, str] = Field(description="Payload file (relative path) -> sha256 hex digest.")
    size_bytes: int = Field(description="Total size of the payload files on disk.")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    dtypes: dict[str, str] = Field(default_factory=dict, description="Tensor name -> torch dtype name.")
    tensor_sha256: dict[str, str] = Field(
        default_factory=dict,
        description="Tensor name -> sha256 of its raw bytes (base and delta: the weights they produce).",
    )
    aliases: dict[str, str] = Field(
        default_factory=dict,
        description="Tied tensors left out of the payload: alias name -> the canonical name it shares.",
    )
    compression: str | None = None
    full_size_bytes: int | None = Field(
        default=None, description="Raw bytes of the tensors this snapshot produces (for ratios)."
    )
    lora: dict[str, object] | None = Field(default=None, description="LoRA rank, alpha, target modules.")
