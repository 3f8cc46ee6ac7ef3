"""Deployment-wide hot-load: fan a snapshot out to every ready replica, all or none (replicas that
switched are rolled back when another fails), record the chain that later replicas replay, and
aggregate the replicas' statuses into the one `HotLoadStatus`."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from firetitan.errors import APIStatusError, ConflictError, FiretitanError, InvalidRequestError
from firetitan.logging import get_logger
from firetitan.names import check_name
from firetitan.server.control_plane.resources import (
    DEP_FAILED,
    DEP_READY,
    DEPLOYMENT,
    Deployment,
    HotLoadRecord,
    Replica,
)
from firetitan.server.control_plane.supervisor import WorkerKey
from firetitan.server.deployment.schemas import (
    HOT_LOAD_PATH,
    HotLoadRequest,
    HotLoadStatus,
    LoadingState,
    ReplicaHotLoadStatus,
    wait_until_serving,
)

if TYPE_CHECKING:
    from firetitan.server.control_plane.controller import ControlPlane

log = get_logger("firetitan.control_plane.hotload")

DEPLOYMENT_HEADER = "fireworks-deployment"
_STATUS_TIMEOUT_S = 10.0


def deployment_from_header(value: str | None) -> tuple[str, str]:
    """`fireworks-deployment: accounts/<account>/deployments/<id>` (as the official SDK sends it)."""
    parts = (value or "").strip().split("/")
    if len(parts) != 4 or parts[0] != "accounts" or parts[2] != "deployments" or not parts[1] or not parts[3]:
        raise InvalidRequestError(f"header {DEPLOYMENT_HEADER} {value!r} must name a deployment: "
                                  "accounts/<account>/deployments/<id>", field=DEPLOYMENT_HEADER)
    return check_name(parts[1], field=DEPLOYMENT_HEADER), check_name(parts[3], field=DEPLOYMENT_HEADER)


class HotLoads:
    """Hot-load across a deployment's replicas; holds the deployment's lock for a whole load."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._gc_lock = asyncio.Lock()

    async def load(self, account: str, deployment_id: str, req: HotLoadRequest) -> HotLoadStatus:
        """Load one snapshot into every ready replica, or into none; remember it for later replicas."""
        deployments = self.cp.deployments
        async with self.cp.lock(DEPLOYMENT, account, deployment_id):
            dep = deployments.get(account, deployment_id)
            ready = [r for r in dep.replicas if r.state == DEP_READY and r.url]
            if not ready:
                raise ConflictError(f"deployment {dep.name!r} has no ready replicas (state {dep.state}, "
                                    f"maxReplicaCount {dep.max_replica_count}); scale it up before hot-loading",
                                    field="deploymentId")
            previous = self._true_previous(dep, req)
            body = req.model_dump(mode="json", exclude_none=True)
            if previous is not None:
                # Replicas get the delta's own base, which is also what the record replays later.
                body["incremental_snapshot_metadata"] = {**body.get("incremental_snapshot_metadata", {}),
                                                         "previous_snapshot_identity": previous}
            dep.last_hot_load = LoadingState(stage="loading", identity=req.identity,
                                             target_snapshot_identity=req.identity, mode=req.mode,
                                             started_at=time.time())
            deployments.save(account, dep)
            results = await asyncio.gather(*(self._load_replica(r, body, req.identity) for r in ready),
                                           return_exceptions=True)
            failures = [(r.index, res) for r, res in zip(ready, results, strict=True)
                        if isinstance(res, BaseException)]
            if failures:
                switched = [r for r, res in zip(ready, results, strict=True) if not isinstance(res, BaseException)]
                await self._fail(account, dep, req.identity, failures, switched)
            dep.snapshot_chain = next_chain(dep.snapshot_chain, HotLoadRecord(
                identity=req.identity, previous_snapshot_identity=previous))
            dep.last_hot_load.stage, dep.last_hot_load.finished_at = "done", time.time()
            deployments.save(account, dep)
            # Retention runs after the chain is recorded, so what this deployment now serves is kept.
            self.cp.spawn(self._collect_garbage(), "store-gc")
            replicas = [res for res in results if isinstance(res, ReplicaHotLoadStatus)]
            return HotLoadStatus(
                deployment=dep.name, deployment_id=dep.deployment_id, base_model=dep.base_model,
                identity=req.identity, mode=req.mode, readiness=True, current_snapshot_identity=req.identity,
                policy_version=req.identity, loading_state=dep.last_hot_load,
                replica_count=dep.max_replica_count, replicas=replicas)

    async def _collect_garbage(self) -> None:
        """Keep the store bounded: the last K sampler snapshots per run, pins, and every chain a
        deployment serves or replays (`checkpoints/retention.py`; K = $FIRETITAN_STORE_KEEP_LAST)."""
        from firetitan.checkpoints import SnapshotStore, retention  # torch-heavy: only once snapshots exist

        layout = self.cp.layout

        def run() -> None:
            retention.gc(SnapshotStore(layout.store), in_use=retention.in_use_from_state_db(layout.state_db))

        async with self._gc_lock:  # one sweep at a time; a burst of hot-loads does not pile them up
            await asyncio.to_thread(run)

    async def _fail(self, account: str, dep: Deployment, identity: str,
                    failures: list[tuple[int, BaseException]], switched: list[Replica]) -> None:
        """Put the replicas that switched back on what the deployment served, record the outcome and
        raise the first replica's error (named by index)."""
        restored, restarted = [], []
        for replica in switched:
            try:
                if not dep.snapshot_chain:
                    raise ConflictError("nothing to replay: it served its startup weights")
                await self.replay(replica.url or "", dep.snapshot_chain)
                restored.append(replica.index)
            except FiretitanError:
                # Startup weights cannot be hot-loaded back: a fresh replica starts with them.
                await self.cp.supervisor.stop(WorkerKey("replica", account, dep.deployment_id, replica.index))
                replica.state, replica.url, replica.pid = DEP_FAILED, None, None
                replica.message = f"restarting: rolled back from {identity!r}"
                restarted.append(replica.index)
        index, first = failures[0]
        reasons = "; ".join(f"replica {i}: {getattr(e, 'message', None) or e!r}" for i, e in failures)
        outcome = ("no replica switched" if not switched else
                   f"rolled back replicas {restored + restarted} to {dep.current_snapshot_identity!r}"
                   + (f" (restarting {restarted})" if restarted else ""))
        assert dep.last_hot_load is not None
        dep.last_hot_load.stage = "rolled_back" if switched else "error"
        dep.last_hot_load.error = f"{reasons}; {outcome}"
        dep.last_hot_load.finished_at = time.time()
        self.cp.deployments.save(account, dep)
        if restarted:
            self.cp.spawn(self.cp.deployments.reconcile(account, dep.deployment_id), f"rollback-{dep.name}")
        log.warning("hot_load_failed", deployment=dep.name, identity=identity, error=dep.last_hot_load.error)
        if isinstance(first, FiretitanError):
            first.message = f"replica {index}: {first.message}" + (f"; {outcome}" if switched else "")
            raise first
        raise APIStatusError(f"hot-load failed on replica {index}: {first!r}; {outcome}", status_code=502)

    def _true_previous(self, dep: Deployment, req: HotLoadRequest) -> str | None:
        """The base a delta applies to, from the store. The sender may name it, leave it out, or name
        the snapshot the deployment serves on that base (the official SDK's chain)."""
        from firetitan.checkpoints import SnapshotStore  # torch-heavy: only once snapshots are in play

        try:
            base = SnapshotStore(self.cp.layout.store).delta_base(req.identity)
        except FiretitanError:
            return req.previous  # unknown here: the replicas answer with the precise error
        sent = req.previous
        if base is None or sent is None or sent == base:
            return base if base is not None else sent
        chain_base = dep.snapshot_chain[0].identity if dep.snapshot_chain else None
        if sent == dep.current_snapshot_identity and chain_base == base:
            return base
        raise ConflictError(
            f"incremental_snapshot_metadata.previous_snapshot_identity {sent!r} is neither the base of delta "
            f"{req.identity!r} ({base!r}) nor the snapshot {dep.name!r} serves on that base "
            f"({dep.current_snapshot_identity!r})", field="incremental_snapshot_metadata.previous_snapshot_identity")

    async def _load_replica(self, replica: Replica, body: dict[str, Any], identity: str) -> ReplicaHotLoadStatus:
        url = replica.url or ""
        first = HotLoadStatus.model_validate(
            await self.cp.call_worker("POST", f"{url}{HOT_LOAD_PATH}", body, self.cp.settings.hot_load_timeout))
        status = await wait_until_serving(lambda: self._replica_status(url), identity,
                                          self.cp.settings.hot_load_timeout, where=f"replica {replica.index}",
                                          first=first)
        return status.replicas[0].model_copy(update={"replica_index": replica.index})

    async def _replica_status(self, url: str) -> HotLoadStatus:
        return HotLoadStatus.model_validate(
            await self.cp.call_worker("GET", f"{url}{HOT_LOAD_PATH}", None, _STATUS_TIMEOUT_S))

    async def replay(self, url: str, chain: list[HotLoadRecord]) -> None:
        """Bring a replica to what the deployment serves: the base, then the delta on it."""
        for record in chain:
            await self.cp.call_worker("POST", f"{url}{HOT_LOAD_PATH}", _replay_body(record),
                                      self.cp.settings.hot_load_timeout)
            await wait_until_serving(lambda: self._replica_status(url), record.identity,
                                     self.cp.settings.hot_load_timeout, where=f"replica at {url}")

    async def status(self, account: str, deployment_id: str) -> HotLoadStatus:
        dep = self.cp.deployments.get(account, deployment_id)
        ready = [r for r in dep.replicas if r.state == DEP_READY and r.url]

        async def one(replica: Replica) -> ReplicaHotLoadStatus:
            try:
                status = await self._replica_status(replica.url or "")
            except FiretitanError as exc:
                return ReplicaHotLoadStatus(replica_index=replica.index, readiness=False, error=exc.message)
            return status.replicas[0].model_copy(update={"replica_index": replica.index})

        replicas = list(await asyncio.gather(*(one(r) for r in ready)))
        loading = dep.last_hot_load or LoadingState()
        if loading.stage in ("error", "rolled_back"):
            # The deployment-wide outcome is what a reader of any one replica must see: the official
            # SDK reads replicas[0] and fails fast on an error for the snapshot it waits for.
            replicas = [r.model_copy(update={"loading_state": loading}) for r in replicas]
        return HotLoadStatus(
            deployment=dep.name, deployment_id=dep.deployment_id, base_model=dep.base_model,
            readiness=len(replicas) >= dep.max_replica_count > 0 and all(r.readiness for r in replicas),
            current_snapshot_identity=dep.current_snapshot_identity,
            policy_version=dep.current_snapshot_identity or dep.base_model, loading_state=loading,
            replica_count=dep.max_replica_count, replicas=replicas)


def next_chain(chain: list[HotLoadRecord], record: HotLoadRecord) -> list[HotLoadRecord]:
    """What a fresh replica must load to serve `record`: the base its delta applies to, then it.
    Deltas are recorded against their true base (not against each other), so older deltas drop out."""
    if record.previous_snapshot_identity is None:
        return [record]
    bases = [r for r in chain if r.identity == record.previous_snapshot_identity]
    return [*bases[:1], record]


def _replay_body(record: HotLoadRecord) -> dict[str, Any]:
    meta = {"previous_snapshot_identity": record.previous_snapshot_identity} \
        if record.previous_snapshot_identity else None
    return {"identity": record.identity, "incremental_snapshot_metadata": meta,
            "reset_prompt_cache": True, "mode": "SYNC"}
