"""The sampler snapshot store: base / delta / LoRA snapshots under `root/snapshots/<identity>/`."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from firetitan.checkpoints import delta as dz
from firetitan.checkpoints.identity import make_identity, validate_name
from firetitan.checkpoints.manifest import FORMAT_VERSION, MANIFEST_FILE, SnapshotKind, SnapshotManifest
from firetitan.errors import ConflictError, InvalidRequestError, NotFoundError, SnapshotError
from firetitan.logging import get_logger
from firetitan.names import resolve_under

log = get_logger(__name__)

BASE_WEIGHTS_FILE = "model.safetensors"
DELTA_FILE = "delta.safetensors"
LORA_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHTS_FILE = "adapter_model.safetensors"
_DELTA_FORMAT = "firetitan-xor-shuffle-v1"
_TMP_PREFIX = ".tmp-"


class SnapshotStore:
    """Sampler snapshots in a directory shared by trainers (writers) and deployments (readers).

    Every snapshot is published by renaming a fully written, fsynced temp directory, so a reader
    sees either nothing or the whole snapshot. Saving an identity that already exists is a no-op when
    the payload is the same and a `ConflictError` otherwise.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- writing

    def save_base(
        self,
        name: str,
        state_dict: Mapping[str, torch.Tensor],
        config: Any,
        tokenizer: Any = None,
        base_model: str | None = None,
        *,
        client_suffix: str | None = None,
    ) -> SnapshotManifest:
        """Write a full snapshot in Hugging Face layout (`from_pretrained(dir)` loads it).

        `name` is the identity to publish under (already suffixed by `make_identity`), unless
        `client_suffix` is given, in which case the identity is `make_identity(name, client_suffix)`.
        Tied weights (lm_head sharing the input embedding) are stored once, as transformers does.
        """
        identity, user_name = self._identity(name, client_suffix)
        tie = bool(_config_get(config, "tie_word_embeddings", False))
        canonical, aliases = _split_aliases(state_dict, tie_embeddings=tie)
        with self._staging(identity) as tmp:
            save_file(canonical, str(tmp / BASE_WEIGHTS_FILE), metadata={"format": "pt"})
            _write_config(config, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            manifest = self._publish(
                tmp,
                identity,
                name=user_name,
                kind="base",
                base_model=base_model or _config_get(config, "_name_or_path", None) or None,
                dtypes={k: dz.dtype_name(t.dtype) for k, t in canonical.items()},
                tensor_sha256={k: dz.tensor_sha256(t) for k, t in canonical.items()},
                aliases=aliases,
                full_size_bytes=_raw_size(canonical),
            )
        log.info("snapshot saved", identity=identity, kind="base", size_bytes=manifest.size_bytes)
        return manifest

    def save_delta(
        self,
        name: str,
        state_dict: Mapping[str, torch.Tensor],
        previous_identity: str,
        *,
        base_state_dict: Mapping[str, torch.Tensor] | None = None,
        codec: str = dz.DEFAULT_CODEC,
        client_suffix: str | None = None,
    ) -> SnapshotManifest:
        """Write a lossless delta of `state_dict` against the base snapshot `previous_identity`.

        Deltas are always against a base (never chained), so a deployment holding that base can apply
        any later delta directly. Pass `base_state_dict` (the weights of that base, e.g. kept in memory
        since it was saved) to skip reading the base back from disk. If it is not really that base,
        the delta still round-trips wrongly nowhere: applying it fails its per-tensor result digests.
        """
        identity, user_name = self._identity(name, client_suffix)
        if codec not in dz.CODECS:
            raise InvalidRequestError(f"codec {codec!r} is not one of {', '.join(dz.CODECS)}", field="codec")
        base_manifest = self.manifest(previous_identity, field="previous_snapshot_identity")
        if base_manifest.kind != "base":
            raise SnapshotError(
                f"previous_snapshot_identity {previous_identity!r} is a {base_manifest.kind} snapshot; "
                "a delta applies to a base snapshot only"
            )
        if base_state_dict is None:
            base_state_dict = self.load_state_dict(previous_identity)
        canonical = _apply_aliases_for_save(state_dict, base_manifest.aliases)

        index: dict[str, dict[str, Any]] = {}
        blobs: dict[str, torch.Tensor] = {}
        for key, new in canonical.items():
            entry: dict[str, Any] = {"dtype": dz.dtype_name(new.dtype), "shape": list(new.shape)}
            base = base_state_dict.get(key)
            base_digest = base_manifest.tensor_sha256.get(key)
            if base is not None and base_digest is not None and _same_layout(base, new):
                blob = dz.encode_xor(new, base.detach().to("cpu"), codec)
                entry.update(encoding="same" if blob is None else "xor", base_sha256=base_digest)
            else:
                blob = dz.encode_raw(new, codec)
                entry["encoding"] = "raw"
            if blob is not None:
                blobs[key] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            entry["sha256"] = dz.tensor_sha256(new)
            index[key] = entry

        meta = {
            "format": _DELTA_FORMAT,
            "codec": codec,
            "base_identity": previous_identity,
            "base_checksum": base_manifest.checksum,
            "index": json.dumps(index, sort_keys=True),
        }
        with self._staging(identity) as tmp:
            save_file(blobs, str(tmp / DELTA_FILE), metadata=meta)
            manifest = self._publish(
                tmp,
                identity,
                name=user_name,
                kind="delta",
                base_model=base_manifest.base_model,
                previous_snapshot_identity=previous_identity,
                previous_snapshot_checksum=base_manifest.checksum,
                dtypes={k: e["dtype"] for k, e in index.items()},
                tensor_sha256={k: e["sha256"] for k, e in index.items()},
                aliases=dict(base_manifest.aliases),
                compression=codec,
                full_size_bytes=_raw_size(canonical),
            )
        log.info(
            "snapshot saved",
            identity=identity,
            kind="delta",
            base=previous_identity,
            size_bytes=manifest.size_bytes,
            full_size_bytes=manifest.full_size_bytes,
        )
        return manifest

    def save_lora(
        self,
        name: str,
        peft_model: Any,
        *,
        base_model: str | None = None,
        client_suffix: str | None = None,
    ) -> SnapshotManifest:
        """Write the PEFT adapter of `peft_model` (`PeftModel.from_pretrained(base, dir)` loads it)."""
        identity, user_name = self._identity(name, client_suffix)
        adapter = getattr(peft_model, "active_adapter", "default")
        peft_config = getattr(peft_model, "peft_config", {}).get(adapter)
        if peft_config is None:
            raise InvalidRequestError("save_lora needs a peft model with an active adapter", field="peft_model")
        with self._staging(identity) as tmp:
            # No embedding-layer export: it is not needed for LoRA on linear layers and, in "auto" mode,
            # peft would probe the hub for the base model's config.
            peft_model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
            if not (tmp / LORA_CONFIG_FILE).is_file() or not (tmp / LORA_WEIGHTS_FILE).is_file():
                # peft writes non-default adapters into a subfolder; flatten so the layout is fixed.
                sub = tmp / adapter
                for f in (LORA_CONFIG_FILE, LORA_WEIGHTS_FILE):
                    if (sub / f).is_file():
                        os.replace(sub / f, tmp / f)
            weights = load_file(str(tmp / LORA_WEIGHTS_FILE))
            manifest = self._publish(
                tmp,
                identity,
                name=user_name,
                kind="lora",
                base_model=base_model or getattr(peft_config, "base_model_name_or_path", None),
                dtypes={k: dz.dtype_name(t.dtype) for k, t in weights.items()},
                tensor_sha256={k: dz.tensor_sha256(t) for k, t in weights.items()},
                full_size_bytes=_raw_size(weights),
                lora={
                    "rank": int(peft_config.r),
                    "alpha": float(peft_config.lora_alpha),
                    "target_modules": sorted(peft_config.target_modules or []),
                },
            )
        log.info("snapshot saved", identity=identity, kind="lora", size_bytes=manifest.size_bytes)
        return manifest

    def delete(self, identity: str) -> None:
        """Remove a snapshot (a delta whose base is deleted can no longer be applied)."""
        path = self._dir(identity)
        if not path.is_dir():
            raise NotFoundError(f"snapshot {identity!r} does not exist", field="identity")
        trash = self.snapshots_dir / f"{_TMP_PREFIX}del-{identity}-{os.urandom(4).hex()}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # ----------------------------------------------------------------- reading

    def manifest(self, identity: str, field: str = "identity") -> SnapshotManifest:
        path = self._dir(identity, field=field) / MANIFEST_FILE
        try:
            raw = path.read_text()
        except FileNotFoundError:
            raise NotFoundError(f"snapshot {identity!r} does not exist", field=field) from None
        try:
            manifest = SnapshotManifest.model_validate_json(raw)
        except ValidationError as exc:
            raise SnapshotError(f"snapshot {identity!r} has an unreadable manifest: {exc}") from exc
        if manifest.format_version > FORMAT_VERSION:
            raise SnapshotError(
                f"snapshot {identity!r} has format_version {manifest.format_version}; this firetitan "
                f"reads up to {FORMAT_VERSION}"
            )
        return manifest

    def delta_base(self, identity: str) -> str | None:
        """The base snapshot a delta applies to (deltas are always taken against a base, never against
        another delta); None for a base or a LoRA snapshot. Raises like `manifest` for an unknown one."""
        manifest = self.manifest(identity)
        return manifest.previous_snapshot_identity if manifest.kind == "delta" else None

    def exists(self, identity: str) -> bool:
        return (self._dir(identity) / MANIFEST_FILE).is_file()

    def list(self) -> list[SnapshotManifest]:
        """Every published snapshot, oldest first (temp and half-written directories are skipped)."""
        out = []
        for entry in self.snapshots_dir.iterdir():
            if entry.name.startswith(".") or not (entry / MANIFEST_FILE).is_file():
                continue
            with contextlib.suppress(SnapshotError, NotFoundError):
                out.append(self.manifest(entry.name))
        return sorted(out, key=lambda m: (m.created_at, m.identity))

    def verify(self, identity: str) -> SnapshotManifest:
        """Recompute every payload file's sha256; raise `SnapshotError` naming the first bad file."""
        manifest = self.manifest(identity)
        root = self._dir(identity)
        on_disk = set(_payload_files(root))
        if on_disk != set(manifest.files):
            missing = sorted(set(manifest.files) - on_disk)
            extra = sorted(on_disk - set(manifest.files))
            raise SnapshotError(f"snapshot {identity!r} payload files differ: missing {missing}, extra {extra}")
        for rel, digest in manifest.files.items():
            if _file_sha256(root / rel) != digest:
                raise SnapshotError(f"snapshot {identity!r} is corrupt: checksum mismatch in {rel}")
        if _combine(manifest.files) != manifest.checksum:
            raise SnapshotError(f"snapshot {identity!r} manifest checksum does not match its file digests")
        return manifest

    def base_dir(self, identity: str) -> Path:
        """The Hugging Face directory of a base snapshot."""
        return self._kind_dir(identity, "base")

    def lora_dir(self, identity: str) -> Path:
        """The PEFT adapter directory of a LoRA snapshot."""
        return self._kind_dir(identity, "lora")

    def load_state_dict(
        self,
        identity: str,
        base_state_dict: Mapping[str, torch.Tensor] | None = None,
        *,
        base_identity: str | None = None,
        verify: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The weights a snapshot stands for, on CPU, with tied aliases restored as shared tensors.

        base: read from disk. lora: the adapter tensors. delta: applied to `base_state_dict` (the
        weights of its base; read from the store when None). When `base_identity` (what the caller
        has loaded) is given it must equal the delta's base. Every base tensor the delta touches must
        match the base's digest, and every result tensor the digest recorded at save time; any
        mismatch raises `SnapshotError`, so a wrong base is refused rather than served. Tensors the
        delta leaves unchanged are returned as the (CPU) base tensors themselves, not copies.
        """
        manifest = self.manifest(identity)
        root = self._dir(identity)
        if manifest.kind == "base":
            tensors = _load_safetensors(root / BASE_WEIGHTS_FILE, identity)
            if verify:
                _check_digests(tensors, manifest.tensor_sha256, identity)
            return _expand_aliases(tensors, manifest.aliases)
        if manifest.kind == "lora":
            tensors = _load_safetensors(root / LORA_WEIGHTS_FILE, identity)
            if verify:
                _check_digests(tensors, manifest.tensor_sha256, identity)
            return tensors
        return self._apply_delta(manifest, root, base_state_dict, base_identity, verify)

    # ----------------------------------------------------------------- internals

    def _apply_delta(
        self,
        manifest: SnapshotManifest,
        root: Path,
        base_state_dict: Mapping[str, torch.Tensor] | None,
        base_identity: str | None,
        verify: bool,
    ) -> dict[str, torch.Tensor]:
        identity, prev = manifest.identity, manifest.previous_snapshot_identity
        if base_identity is not None and base_identity != prev:
            raise SnapshotError(
                f"delta {identity!r} applies to base {prev!r}, but the loaded base is {base_identity!r}"
            )
        if base_state_dict is None:
            if prev is None:
                raise SnapshotError(f"delta {identity!r} does not name its base")
            base_manifest = self.manifest(prev, field="previous_snapshot_identity")
            if base_manifest.checksum != manifest.previous_snapshot_checksum:
                raise SnapshotError(
                    f"delta {identity!r} was made against base {prev!r} with checksum "
                    f"{manifest.previous_snapshot_checksum}, but that base now has {base_manifest.checksum}"
                )
            base_state_dict = self.load_state_dict(prev, verify=verify)
        try:
            with safe_open(str(root / DELTA_FILE), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _DELTA_FORMAT:
                    raise SnapshotError(f"delta {identity!r} has unknown format {meta.get('format')!r}")
                if meta.get("base_identity") != prev or meta.get("base_checksum") != manifest.previous_snapshot_checksum:
                    raise SnapshotError(f"delta {identity!r} payload and manifest disagree about its base")
                codec = meta["codec"]
                index: dict[str, dict[str, Any]] = json.loads(meta["index"])
                blob_keys = set(f.keys())
                out: dict[str, torch.Tensor] = {}
                for key, entry in index.items():
                    out[key] = _apply_entry(f, key, entry, blob_keys, base_state_dict, codec, identity, prev)
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
            raise SnapshotError(f"delta {identity!r} payload is unreadable: {exc}") from exc
        if verify:
            changed = {k: out[k] for k, e in index.items() if e["encoding"] != "same"}
            _check_digests(changed, {k: index[k]["sha256"] for k in changed}, identity)
        return _expand_aliases(out, manifest.aliases)

    def _identity(self, name: str, client_suffix: str | None) -> tuple[str, str]:
        if client_suffix is None:
            return validate_name(name), name
        return make_identity(name, client_suffix), name

    def _dir(self, identity: str, field: str = "identity") -> Path:
        # Checked by the name rule and resolved inside the store, so no identity (nor a planted
        # symlink) can address anything outside `snapshots/`.
        return resolve_under(self.snapshots_dir, identity, field=field)

    def _kind_dir(self, identity: str, kind: SnapshotKind) -> Path:
        manifest = self.manifest(identity)
        if manifest.kind != kind:
            raise InvalidRequestError(
                f"snapshot {identity!r} is a {manifest.kind} snapshot, not a {kind} snapshot", field="identity"
            )
        return self._dir(identity)

    @contextlib.contextmanager
    def _staging(self, identity: str) -> Iterator[Path]:
        tmp = self.snapshots_dir / f"{_TMP_PREFIX}{identity}-{os.getpid()}-{os.urandom(4).hex()}"
        tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a no-op once published (renamed away)

    def _publish(self, tmp: Path, identity: str, **fields: Any) -> SnapshotManifest:
        files = {rel: _file_sha256(tmp / rel) for rel in _payload_files(tmp)}
        manifest = SnapshotManifest(
            identity=identity,
            checksum=_combine(files),
            files=files,
            size_bytes=sum((tmp / rel).stat().st_size for rel in files),
            **fields,
        )
        _write_durable(tmp / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
        for rel in files:
            _fsync_path(tmp / rel)
        _fsync_path(tmp)
        final = self._dir(identity)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
            return self._existing(identity, manifest)
        _fsync_path(self.snapshots_dir)
        return manifest

    def _existing(self, identity: str, new: SnapshotManifest) -> SnapshotManifest:
        # Publishing lost to an existing directory: same payload is an idempotent retry.
        deadline = time.monotonic() + 5.0
        while True:
            try:
                old = self.manifest(identity)
                break
            except NotFoundError:
                # Only a torn directory from a crashed writer lacks a manifest; wait briefly, then refuse.
                if time.monotonic() > deadline:
                    raise ConflictError(
                        f"snapshot {identity!r} exists but has no manifest", field="name"
                    ) from None
                time.sleep(0.05)
        same = (
            old.kind == new.kind
            and old.checksum == new.checksum
            and old.previous_snapshot_identity == new.previous_snapshot_identity
        )
        if not same:
            raise ConflictError(
                f"a different snapshot named {identity!r} already exists; choose another name", field="name"
            )
        return old


# ----------------------------------------------------------------------------- helpers


def _apply_entry(
    f: Any,
    key: str,
    entry: dict[str, Any],
    blob_keys: set[str],
    base_state_dict: Mapping[str, torch.Tensor],
    codec: str,
    identity: str,
    prev: str | None,
) -> torch.Tensor:
    encoding = entry["encoding"]
    dtype, shape = dz.parse_dtype(entry["dtype"]), list(entry["shape"])
    if encoding == "raw":
        return dz.decode_raw(_blob(f, key, blob_keys), dtype, shape, codec)
    base = base_state_dict.get(key)
    if base is None:
        raise SnapshotError(f"delta {identity!r} needs tensor {key!r} from base {prev!r}, which is missing")
    base = base.detach().to("cpu")
    if base.dtype != dtype or list(base.shape) != shape:
        raise SnapshotError(
            f"delta {identity!r} applies to base {prev!r}, but the given base's {key!r} is "
            f"{dz.dtype_name(base.dtype)}{list(base.shape)}, expected {entry['dtype']}{shape}"
        )
    if dz.tensor_sha256(base) != entry["base_sha256"]:
        raise SnapshotError(
            f"delta {identity!r} applies to base {prev!r}, but the given base differs at tensor {key!r}"
        )
    if encoding == "same":
        return base
    if encoding != "xor":
        raise SnapshotError(f"delta {identity!r} has unknown encoding {encoding!r} for {key!r}")
    return dz.decode_xor(_blob(f, key, blob_keys), base, codec)


def _blob(f: Any, key: str, blob_keys: set[str]) -> memoryview:
    if key not in blob_keys:
        return memoryview(b"")
    return memoryview(f.get_tensor(key).numpy())


def _config_get(config: Any, key: str, default: Any) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _write_config(config: Any, directory: Path) -> None:
    if hasattr(config, "save_pretrained"):
        config.save_pretrained(str(directory))
    elif isinstance(config, Mapping):
        (directory / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    else:
        raise InvalidRequestError("config must be a transformers PretrainedConfig or a dict", field="config")


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)


def _raw_size(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _storage_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    if t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _split_aliases(
    state_dict: Mapping[str, torch.Tensor], tie_embeddings: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that are the same parameter under another name (safetensors refuses shared storage).

    The canonical copy kept is the one transformers keeps (the input embedding over `lm_head`).
    """
    groups: dict[Any, list[str]] = {}
    for key, t in state_dict.items():
        groups.setdefault(_storage_key(t) or ("unique", key), []).append(key)
    aliases: dict[str, str] = {}
    for names in groups.values():
        if len(names) > 1:
            keep = min(names, key=lambda n: ("lm_head" in n, len(n), n))
            aliases.update({n: keep for n in names if n != keep})
    if tie_embeddings and "lm_head.weight" in state_dict and "lm_head.weight" not in aliases:
        embeds = [k for k in state_dict if k.endswith("embed_tokens.weight") and k not in aliases]
        if len(embeds) == 1:
            if not torch.equal(state_dict["lm_head.weight"], state_dict[embeds[0]]):
                raise SnapshotError(
                    "config has tie_word_embeddings=True but lm_head.weight differs from "
                    f"{embeds[0]}; from_pretrained would silently drop lm_head.weight"
                )
            aliases["lm_head.weight"] = embeds[0]
    canonical: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, t in state_dict.items():
        if key in aliases:
            continue
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen_storage:
            t = t.clone()  # partial overlap with another kept tensor: store its own copy
        elif ptr is not None:
            seen_storage.add(ptr)
        canonical[key] = t
    return canonical, aliases


def _apply_aliases_for_save(
    state_dict: Mapping[str, torch.Tensor], aliases: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        target = aliases.get(key)
        if target is not None:
            other = state_dict.get(target)
            if other is not None and not (_storage_key(t) == _storage_key(other) or torch.equal(t, other)):
                raise SnapshotError(
                    f"{key!r} is tied to {target!r} in the base snapshot but now differs from it"
                )
            continue
        out[key] = t.detach().to("cpu").contiguous()
    return out


def _expand_aliases(tensors: dict[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    for alias, target in aliases.items():
        if target in tensors:
            tensors[alias] = tensors[target]
    return tensors


def _check_digests(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, str], identity: str) -> None:
    if set(tensors) != set(expected):
        raise SnapshotError(f"snapshot {identity!r} tensors do not match its manifest")
    for key, t in tensors.items():
        if dz.tensor_sha256(t) != expected[key]:
            raise SnapshotError(f"snapshot {identity!r} is corrupt: tensor {key!r} does not match its digest")


def _load_safetensors(path: Path, identity: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {identity!r} is missing {path.name}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise SnapshotError(f"snapshot {identity!r} has an unreadable {path.name}: {exc}") from exc


def _payload_files(root: Path) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for fname in files:
            rel = os.path.relpath(os.path.join(dirpath, fname), root)
            if rel != MANIFEST_FILE:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _combine(files: Mapping[str, str]) -> str:
    lines = "".join(f"{rel} {digest}\n" for rel, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
