"""The sampler snapshot store: publish, list, verify and load base / delta / LoRA snapshots under `root/snapshots/`.

The payload work lives beside it: `layout` (file names, digests, durable writes), `weights` (tied
aliases, tensor digests), `delta_payload` (delta encode / apply) and `lora` (adapter export).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from firetitan.checkpoints import delta as dz
from firetitan.checkpoints import lora, pending
from firetitan.checkpoints.delta_payload import apply_delta, encode_delta
from firetitan.checkpoints.identity import make_identity, validate_name
from firetitan.checkpoints.layout import (
    BASE_WEIGHTS_FILE,
    DELTA_FILE,
    LORA_WEIGHTS_FILE,
    TMP_PREFIX,
    combine,
    file_sha256,
    fsync_path,
    payload_files,
    write_durable,
)
from firetitan.checkpoints.manifest import FORMAT_VERSION, MANIFEST_FILE, SnapshotKind, SnapshotManifest
from firetitan.checkpoints.weights import (
    apply_aliases_for_save,
    check_digests,
    config_get,
    expand_aliases,
    load_safetensors,
    raw_size,
    split_aliases,
    tensor_digests,
    write_config,
)
from firetitan.errors import ConflictError, InvalidRequestError, NotFoundError, SnapshotError
from firetitan.logging import get_logger
from firetitan.names import resolve_under

log = get_logger(__name__)


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
        tie = bool(config_get(config, "tie_word_embeddings", False))
        canonical, aliases = split_aliases(state_dict, tie_embeddings=tie)
        with self._staging(identity) as tmp:
            save_file(canonical, str(tmp / BASE_WEIGHTS_FILE), metadata={"format": "pt"})
            write_config(config, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            manifest = self._publish(
                tmp,
                identity,
                name=user_name,
                kind="base",
                base_model=base_model or config_get(config, "_name_or_path", None) or None,
                dtypes={k: dz.dtype_name(t.dtype) for k, t in canonical.items()},
                tensor_sha256=tensor_digests(canonical),
                aliases=aliases,
                full_size_bytes=raw_size(canonical),
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
        canonical = apply_aliases_for_save(state_dict, base_manifest.aliases)

        index, blobs, meta = encode_delta(canonical, base_state_dict, base_manifest, previous_identity, codec)
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
                full_size_bytes=raw_size(canonical),
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
        adapter, peft_config = lora.active_adapter_config(peft_model)
        with self._staging(identity) as tmp:
            weights = lora.write_adapter(peft_model, adapter, tmp)
            manifest = self._publish(
                tmp, identity, name=user_name, **lora.manifest_fields(peft_config, weights, base_model)
            )
        log.info("snapshot saved", identity=identity, kind="lora", size_bytes=manifest.size_bytes)
        return manifest

    def delete(self, identity: str) -> None:
        """Remove a snapshot (a delta whose base is deleted can no longer be applied)."""
        path = self._dir(identity)
        if not path.is_dir():
            raise NotFoundError(f"snapshot {identity!r} does not exist", field="identity")
        trash = self.snapshots_dir / f"{TMP_PREFIX}del-{identity}-{os.urandom(4).hex()}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # ----------------------------------------------------------------- reading

    def manifest(self, identity: str, field: str = "identity", *, wait: bool = True) -> SnapshotManifest:
        """A published snapshot's manifest. One a trainer still writes in the background (pending) is
        waited for (bounded; not with `wait=False`), so a save that returned early reads back like one
        that wrote its files."""
        path = self._dir(identity, field=field) / MANIFEST_FILE
        try:
            raw = path.read_text()
        except FileNotFoundError:
            if not wait or pending.read(self.snapshots_dir, identity) is None:
                raise NotFoundError(f"snapshot {identity!r} does not exist", field=field) from None
            self.wait_published(identity)
            try:
                raw = path.read_text()
            except FileNotFoundError:
                raise NotFoundError(f"snapshot {identity!r} is still being written in the background (or its "
                                    "write failed: see the trainer's status)", field=field) from None
        pending.clear_if_orphaned(self.snapshots_dir, identity)
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
        another delta); None for a base or a LoRA snapshot. A snapshot still being written in the
        background answers from its pending marker. Raises like `manifest` for an unknown one."""
        kind, previous = self.chain_facts(identity)
        return previous if kind == "delta" else None

    def chain_facts(self, identity: str) -> tuple[str, str | None]:
        """(kind, base of a delta) from the manifest, or from the pending marker while it is written."""
        try:
            manifest = self.manifest(identity, wait=False)
        except NotFoundError:
            marker = pending.read(self.snapshots_dir, identity)
            if marker is None:
                raise
            return marker["kind"], marker["previous_snapshot_identity"]
        return manifest.kind, manifest.previous_snapshot_identity

    def wait_published(self, identity: str, timeout_s: float | None = None) -> None:
        """Wait (bounded, $FIRETITAN_SNAPSHOT_PENDING_WAIT_S) while `identity` is written in the background."""
        pending.wait_published(self.snapshots_dir, identity, lambda: self.exists(identity), timeout_s)

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

    def verify(self, identity: str, *, tensors_checked: bool = False) -> SnapshotManifest:
        """Recompute every payload file's sha256; raise `SnapshotError` naming the first bad file.

        `tensors_checked`: the caller loads a base with `load_state_dict(verify=True)`, which checks
        every weight tensor against its digest, so the weights file is not hashed a second time here.
        """
        manifest = self.manifest(identity)
        root = self._dir(identity)
        skip = {BASE_WEIGHTS_FILE} if tensors_checked and manifest.kind == "base" else set()
        on_disk = set(payload_files(root))
        if on_disk != set(manifest.files):
            missing = sorted(set(manifest.files) - on_disk)
            extra = sorted(on_disk - set(manifest.files))
            raise SnapshotError(f"snapshot {identity!r} payload files differ: missing {missing}, extra {extra}")
        for rel, digest in manifest.files.items():
            if rel not in skip and file_sha256(root / rel) != digest:
                raise SnapshotError(f"snapshot {identity!r} is corrupt: checksum mismatch in {rel}")
        if combine(manifest.files) != manifest.checksum:
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
            tensors = load_safetensors(root / BASE_WEIGHTS_FILE, identity)
            if verify:
                check_digests(tensors, manifest.tensor_sha256, identity)
            return expand_aliases(tensors, manifest.aliases)
        if manifest.kind == "lora":
            tensors = load_safetensors(root / LORA_WEIGHTS_FILE, identity)
            if verify:
                check_digests(tensors, manifest.tensor_sha256, identity)
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
        base_digests = None
        if base_state_dict is not None and base_identity is not None and verify:
            # The caller holds this very base, loaded (and digest-checked) from the store: trust its
            # manifest's digests instead of hashing every base tensor again for each delta.
            base_manifest = self.manifest(prev, field="previous_snapshot_identity")
            if base_manifest.checksum == manifest.previous_snapshot_checksum:
                base_digests = base_manifest.tensor_sha256
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
        return apply_delta(root / DELTA_FILE, manifest, base_state_dict, verify, base_digests)

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
        tmp = self.snapshots_dir / f"{TMP_PREFIX}{identity}-{os.getpid()}-{os.urandom(4).hex()}"
        tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a no-op once published (renamed away)

    def _publish(self, tmp: Path, identity: str, **fields: Any) -> SnapshotManifest:
        files = {rel: file_sha256(tmp / rel) for rel in payload_files(tmp)}
        manifest = SnapshotManifest(
            identity=identity,
            checksum=combine(files),
            files=files,
            size_bytes=sum((tmp / rel).stat().st_size for rel in files),
            **fields,
        )
        write_durable(tmp / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
        for rel in files:
            fsync_path(tmp / rel)
        fsync_path(tmp)
        final = self._dir(identity)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
            return self._existing(identity, manifest)
        fsync_path(self.snapshots_dir)
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
