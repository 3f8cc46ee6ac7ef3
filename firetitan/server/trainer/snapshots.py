"""A trainer's sampler-snapshot chain: base or delta, published through shared memory with the durable files written in the background.

Same host (a replica of this store registered as a reader in the store's shared-memory directory, see
`checkpoints/shm.py`): the weights are cast-copied once into a segment, a pending marker announces
the snapshot's kind and base, and the save returns; the base/delta files are written by this chain's
one background writer thread. Otherwise, or with $FIRETITAN_SHM_SYNC=0, the files are written before
the save returns, as they always were.

Ordering: the writes run one at a time, in save order, on one thread, so a delta is never encoded
against a base whose files (and in-memory copy) are not complete: its base was queued before it. At
most `MAX_WRITES_IN_FLIGHT` (2) are queued or running: a save waits while two are (a write keeps its
segment mapped, so this also keeps the memory of segments at `shm.MAX_LIVE_SEGMENTS`); a write has the
next train step to finish in. A background failure is raised by the next save (which is refused; the
chain restarts with a new base) and shown in `status()`; it is never dropped. The rebase decision uses
the sizes of the deltas written so far.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from firetitan.checkpoints import SnapshotStore, make_identity, parallel, pending, shm, validate_name
from firetitan.checkpoints.manifest import SnapshotManifest
from firetitan.checkpoints.weights import config_get, raw_size, split_aliases
from firetitan.errors import InvalidRequestError, SnapshotError
from firetitan.logging import get_logger

log = get_logger("firetitan.trainer.snapshots")

# When the last delta's payload passes this fraction of a full save, the next automatic snapshot is a
# fresh base (deltas against a drifting base only grow).
REBASE_DELTA_FRACTION = 0.5
MAX_WRITES_IN_FLIGHT = 2


class SnapshotChain:
    """The base the next delta applies to, the shm publisher, and the background writer."""

    def __init__(self, store: SnapshotStore, *, shm_sync: bool | None = None) -> None:
        self.store = store
        self.base_identity: str | None = None
        self.base_state: dict[str, torch.Tensor] | None = None
        self.rebase_due = False
        use = shm.enabled() if shm_sync is None else shm_sync
        directory = shm.segment_dir(store.root) if use else None
        self.publisher = shm.ShmPublisher(directory) if directory is not None else None
        pending.sweep_dead(store.snapshots_dir)  # markers of a trainer killed mid-write
        self._writer: ThreadPoolExecutor | None = None
        self._inflight: deque[tuple[str, Future[None]]] = deque()
        self._base_state_of: str | None = None  # the identity `base_state` holds
        self.last_error: str | None = None
        self.last_durable: str | None = None
        self.last_flush_wait_s = 0.0  # how long the last save waited for the previous background write

    # -- the public steps
    def save(self, name: str, client_suffix: str | None, checkpoint_type: str | None,
             state: Callable[[], dict[str, torch.Tensor]], *, dtype: torch.dtype, config: Callable[[], Any],
             tokenizer: Callable[[], Any], base_model: str | None) -> SnapshotManifest | dict[str, Any]:
        """One full-parameter snapshot: a manifest when written now, or a dict of its facts when the
        files are written in the background. `state()` gives the live weights (any dtype); `dtype` is
        the snapshot's (serving) dtype."""
        waited = time.perf_counter()
        self._settle(keep=MAX_WRITES_IN_FLIGHT - 1)
        self.last_flush_wait_s = time.perf_counter() - waited
        kind = checkpoint_type or ("delta" if self.base_identity and not self.rebase_due else "base")
        if kind == "delta" and self.base_identity is None:
            raise InvalidRequestError(
                "checkpoint_type: 'delta' needs an earlier base snapshot from this model; save a base first",
                field="checkpoint_type")
        identity = make_identity(name, client_suffix) if client_suffix is not None else validate_name(name)
        live = state()
        previous = self.base_identity if kind == "delta" else None
        if not self._same_host() or self.store.exists(identity):  # a retry keeps the store's idempotency
            self.flush()
            manifest = self._write(kind, name, client_suffix, previous, _cast(live, dtype), config, tokenizer,
                                   base_model)
            if manifest.kind == "base":
                self.base_identity, self.rebase_due = manifest.identity, False
            return manifest
        assert self.publisher is not None
        tie = bool(config_get(config(), "tie_word_embeddings", False))
        canonical, aliases = split_aliases(live, tie_embeddings=tie)
        started = time.perf_counter()
        segment, mm, header = self.publisher.publish(identity, canonical, dtype, kind=kind, previous=previous,
                                                     aliases=aliases)
        pending.mark(self.store.snapshots_dir, identity, kind, previous)
        if kind == "base":
            self.base_identity, self.rebase_due = identity, False
        tensors = shm.segment_tensors(mm, header)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="snapshot-writer",
                                              initializer=parallel.background_thread)
        future = self._writer.submit(self._write_background, kind, name, client_suffix, previous, identity,
                                     tensors, mm, header, config, tokenizer, base_model)
        self._inflight.append((identity, future))
        log.info("snapshot_published_shm", identity=identity, kind=kind, segment=segment.file,
                 seconds=round(time.perf_counter() - started, 4))
        return {"identity": identity, "kind": kind, "previous_snapshot_identity": previous,
                "full_size_bytes": raw_size(canonical), "size_bytes": None, "checksum": None}

    def flush(self) -> None:
        """Wait for every background write; raise a failure once (the chain then restarts)."""
        self._settle(keep=0)

    def _settle(self, keep: int) -> None:
        """Collect finished writes and wait until at most `keep` are in flight; raise any failure."""
        failures: list[str] = []

        def drain(limit: int) -> None:
            while self._inflight and (len(self._inflight) > limit or self._inflight[0][1].done()):
                identity, future = self._inflight.popleft()
                try:
                    future.result()
                except Exception as exc:
                    failures.append(f"durable snapshot {identity!r} failed to write in the background: {exc}")
                    log.error("snapshot_background_write_failed", identity=identity, error=str(exc))

        drain(keep)
        if failures:
            drain(0)  # the writes queued after a failure (deltas of a lost base) settle too
            self.last_error = "; ".join(failures)
            self.base_identity, self.base_state, self._base_state_of, self.rebase_due = None, None, None, False
            raise SnapshotError(f"{self.last_error}; this save was refused and the next one writes a new base "
                                "(a deployment that loaded it from shared memory keeps serving it)")

    def writes_done(self) -> bool:
        """Whether every background write has finished (successfully or not); nothing is raised here."""
        return all(future.done() for _identity, future in self._inflight)

    def status(self) -> dict[str, Any]:
        return {"last_base_snapshot": self.base_identity, "shm_sync": self.publisher is not None,
                "durable_pending": [identity for identity, _f in self._inflight],
                "last_durable_snapshot": self.last_durable, "snapshot_error": self.last_error}

    def close(self) -> None:
        """Finish the durable write in flight (errors logged), then remove this trainer's segments."""
        with contextlib.suppress(SnapshotError):
            self.flush()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self.publisher is not None:
            self.publisher.close()

    # -- internals
    def _same_host(self) -> bool:
        return self.publisher is not None and shm.has_live_reader(self.publisher.directory)

    def _write(self, kind: str, name: str, client_suffix: str | None, previous: str | None,
               state: dict[str, torch.Tensor], config: Callable[[], Any], tokenizer: Callable[[], Any],
               base_model: str | None) -> SnapshotManifest:
        if kind == "delta":
            assert previous is not None
            # The base's write ran before this one (same thread, save order), so `base_state` is it.
            held = self.base_state if self._base_state_of == previous else None
            manifest = self.store.save_delta(name, state, previous, base_state_dict=held,
                                             client_suffix=client_suffix)
            full = manifest.full_size_bytes or 0
            if previous == self.base_identity:  # a delta of an older base says nothing about the current one
                self.rebase_due = full > 0 and manifest.size_bytes > REBASE_DELTA_FRACTION * full
        else:
            manifest = self.store.save_base(name, state, config(), tokenizer=tokenizer(), base_model=base_model,
                                            client_suffix=client_suffix)
            # Kept so later deltas need not read the base back from disk.
            self.base_state = {k: v.clone() for k, v in state.items()}
            self._base_state_of = manifest.identity
        self.last_durable = manifest.identity
        return manifest

    def _write_background(self, kind: str, name: str, client_suffix: str | None, previous: str | None,
                          identity: str, tensors: dict[str, torch.Tensor], mm: Any, header: dict[str, Any],
                          config: Callable[[], Any], tokenizer: Callable[[], Any], base_model: str | None) -> None:
        try:
            self._write(kind, name, client_suffix, previous, tensors, config, tokenizer, base_model)
            # The files were encoded from the segment: had anything changed it since it was published,
            # they would hold other weights under valid digests, so check it once more and refuse them.
            bad = shm.first_bad_tensor(mm, header)
            if bad is not None:
                self.store.delete(identity)
                raise SnapshotError(f"shared-memory segment of {identity!r} changed while its files were "
                                    f"written (tensor {bad!r}); the files were removed")
        finally:
            pending.clear(self.store.snapshots_dir, identity)
            # The mapping is released when the last tensor viewing it goes (the segment file stays until
            # the publisher's bound or close() removes it).


def _cast(live: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights as the deployment serves them: on the CPU, floating tensors in the snapshot dtype."""
    out: dict[str, torch.Tensor] = {}
    for k, v in live.items():
        if v.is_floating_point() and v.dtype != dtype:
            v = v.to(dtype)
        out[k] = v.to("cpu")
    return out
