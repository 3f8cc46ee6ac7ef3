"""Delta snapshot payloads: encode a state dict against its base as per-tensor XOR blobs, and apply one back."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from firetitan.checkpoints import delta as dz
from firetitan.checkpoints.manifest import SnapshotManifest
from firetitan.checkpoints.parallel import per_tensor
from firetitan.checkpoints.weights import expand_aliases, same_layout
from firetitan.errors import SnapshotError

DELTA_FORMAT = "firetitan-xor-shuffle-v1"


def encode_delta(
    canonical: Mapping[str, torch.Tensor],
    base_state_dict: Mapping[str, torch.Tensor],
    base_manifest: SnapshotManifest,
    previous_identity: str,
    codec: str,
) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor], dict[str, str]]:
    """The per-tensor index, the blobs and the safetensors metadata of a delta of `canonical` against a base.

    A tensor whose base has the same dtype and shape (and a recorded digest) is stored as the XOR of
    its bits ("same" when nothing changed, so no blob); any other tensor is stored whole ("raw").
    """
    def one(key: str, new: torch.Tensor) -> tuple[dict[str, Any], bytes | None]:
        entry: dict[str, Any] = {"dtype": dz.dtype_name(new.dtype), "shape": list(new.shape)}
        base = base_state_dict.get(key)
        base_digest = base_manifest.tensor_sha256.get(key)
        if base is not None and base_digest is not None and same_layout(base, new):
            blob = dz.encode_xor(new, base.detach().to("cpu"), codec)
            entry.update(encoding="same" if blob is None else "xor", base_sha256=base_digest)
        else:
            blob = dz.encode_raw(new, codec)
            entry["encoding"] = "raw"
        entry["sha256"] = dz.tensor_sha256(new)
        return entry, blob

    # One tensor per task on a small pool: XOR, shuffle, zstd and sha256 release the GIL.
    encoded = per_tensor(one, canonical)
    index = {key: entry for key, (entry, _blob) in encoded.items()}
    blobs = {key: torch.frombuffer(bytearray(blob), dtype=torch.uint8)
             for key, (_entry, blob) in encoded.items() if blob is not None}

    meta = {
        "format": DELTA_FORMAT,
        "codec": codec,
        "base_identity": previous_identity,
        "base_checksum": base_manifest.checksum,
        "index": json.dumps(index, sort_keys=True),
    }
    return index, blobs, meta


def apply_delta(
    path: Path,
    manifest: SnapshotManifest,
    base_state_dict: Mapping[str, torch.Tensor],
    verify: bool,
    base_digests: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """The weights the delta payload at `path` produces from `base_state_dict`, tied aliases restored.

    Every base tensor the delta touches must match the digest recorded at save time, and (with
    `verify`) every changed result tensor its own digest; any mismatch raises `SnapshotError`.
    `base_digests` are the digests the base tensors were already verified against when they were
    loaded (the base's manifest): given, they are compared instead of hashing the base again, so a
    hot-load hashes each tensor once rather than the whole base on every delta.
    """
    identity, prev = manifest.identity, manifest.previous_snapshot_identity
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != DELTA_FORMAT:
                raise SnapshotError(f"delta {identity!r} has unknown format {meta.get('format')!r}")
            if meta.get("base_identity") != prev or meta.get("base_checksum") != manifest.previous_snapshot_checksum:
                raise SnapshotError(f"delta {identity!r} payload and manifest disagree about its base")
            codec = meta["codec"]
            index: dict[str, dict[str, Any]] = json.loads(meta["index"])
            blobs = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"delta {identity!r} payload is unreadable: {exc}") from exc

    def one(key: str, _placeholder: torch.Tensor) -> torch.Tensor:
        entry = index[key]
        t = _apply_entry(blobs, key, entry, base_state_dict, codec, identity, prev, base_digests)
        if verify and entry["encoding"] != "same" and dz.tensor_sha256(t) != entry["sha256"]:
            raise SnapshotError(f"snapshot {identity!r} is corrupt: tensor {key!r} does not match its digest")
        return t

    try:
        # Decode (zstd, unshuffle, XOR) and the digest check of each tensor on the pool, largest first.
        out = per_tensor(one, {k: _sized(e) for k, e in index.items()})
    except KeyError as exc:
        raise SnapshotError(f"delta {identity!r} payload is unreadable: {exc}") from exc
    return expand_aliases(out, manifest.aliases)


def _sized(entry: dict[str, Any]) -> torch.Tensor:
    """A zero-stride stand-in with the entry's element count and size, for ordering the pool's tasks."""
    dtype = dz.parse_dtype(entry["dtype"])
    return torch.empty((), dtype=dtype).expand(*entry["shape"]) if entry["shape"] else torch.empty((), dtype=dtype)


def _apply_entry(
    blobs: Mapping[str, torch.Tensor],
    key: str,
    entry: dict[str, Any],
    base_state_dict: Mapping[str, torch.Tensor],
    codec: str,
    identity: str,
    prev: str | None,
    base_digests: Mapping[str, str] | None,
) -> torch.Tensor:
    encoding = entry["encoding"]
    dtype, shape = dz.parse_dtype(entry["dtype"]), list(entry["shape"])
    if encoding == "raw":
        return dz.decode_raw(_blob(blobs, key), dtype, shape, codec)
    base = base_state_dict.get(key)
    if base is None:
        raise SnapshotError(f"delta {identity!r} needs tensor {key!r} from base {prev!r}, which is missing")
    base = base.detach().to("cpu")
    if base.dtype != dtype or list(base.shape) != shape:
        raise SnapshotError(
            f"delta {identity!r} applies to base {prev!r}, but the given base's {key!r} is "
            f"{dz.dtype_name(base.dtype)}{list(base.shape)}, expected {entry['dtype']}{shape}"
        )
    known = None if base_digests is None else base_digests.get(key)
    if (known if known is not None else dz.tensor_sha256(base)) != entry["base_sha256"]:
        raise SnapshotError(
            f"delta {identity!r} applies to base {prev!r}, but the given base differs at tensor {key!r}"
        )
    if encoding == "same":
        return base
    if encoding != "xor":
        raise SnapshotError(f"delta {identity!r} has unknown encoding {encoding!r} for {key!r}")
    return dz.decode_xor(_blob(blobs, key), base, codec)


def _blob(blobs: Mapping[str, torch.Tensor], key: str) -> memoryview:
    blob = blobs.get(key)
    return memoryview(b"") if blob is None else memoryview(blob.numpy())
