"""Client-side hot-load: put a sampler snapshot on every replica of a deployment (through the
control plane) and wait until all of them serve it, loading a delta's base first where needed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from firetitan.client.http import HttpClient
from firetitan.errors import ConflictError, NotFoundError
from firetitan.server.deployment.schemas import HOT_LOAD_PATH, HotLoadStatus, wait_until_serving

_POLL_S = 0.05
_CHAIN_FIELD = "incremental_snapshot_metadata.previous_snapshot_identity"


class DeploymentHotLoader:
    """Remembers the base every replica holds after its last load, so a training loop's steady state
    is one POST per sync (the control plane fills in a delta's base)."""

    def __init__(self, deployment_id: str, *, account_path: Callable[[str], str], mode: str,
                 timeout_s: float) -> None:
        self.deployment_id = deployment_id
        self._acct = account_path
        self._path = account_path(f"/deployments/{deployment_id}{HOT_LOAD_PATH}")
        self.mode = mode
        self.timeout_s = timeout_s
        self.served_base: str | None = None

    async def load(self, http: HttpClient, identity: str, *, careful: bool = False) -> dict[str, Any]:
        """`careful` (e.g. right after re-attaching to a deployment another run used) skips the fast path."""
        if self.served_base is not None and not careful:
            # A delta of another base is refused with a 409 before any weights change; then take the
            # careful path below.
            try:
                return self._loaded(await self._load_one(http, identity, None))
            except ConflictError as exc:
                if exc.field != _CHAIN_FIELD:
                    raise
        try:
            manifest = await http.request_json("GET", self._acct(f"/snapshots/{identity}"))
        except NotFoundError:
            # Not in the store (yet): a same-host trainer writes the files in the background after
            # publishing the weights in shared memory; the replicas know it, so ask them directly.
            try:
                return self._loaded(await self._load_one(http, identity, None))
            except NotFoundError:
                raise NotFoundError(f"model_path {identity!r} is not a sampler snapshot identity; pass the .path "
                                    "of save_weights_for_sampler(...).result()", field="model_path") from None
            except ConflictError as exc:
                if exc.field != _CHAIN_FIELD:
                    raise
            # A delta of a base the replicas do not hold: its base comes from its manifest, once written.
            manifest = await self._manifest_when_written(http, identity)
        if manifest["kind"] == "delta":
            base = manifest["previous_snapshot_identity"]
            # A delta applies to its base: load the base first wherever a replica holds another one
            # (a re-attached deployment, or one that served another trainer).
            if any(r.base_snapshot_identity != base for r in (await self._status(http)).replicas):
                await self._load_one(http, base, None)
            status = await self._load_one(http, identity, base)
        else:
            status = await self._load_one(http, identity, None)
        return self._loaded(status)

    async def _manifest_when_written(self, http: HttpClient, identity: str) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                return await http.request_json("GET", self._acct(f"/snapshots/{identity}"))
            except NotFoundError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(_POLL_S)

    def _loaded(self, status: HotLoadStatus) -> dict[str, Any]:
        bases = {r.base_snapshot_identity for r in status.replicas}
        self.served_base = bases.pop() if len(bases) == 1 else None
        return status.model_dump(mode="json")

    async def _status(self, http: HttpClient) -> HotLoadStatus:
        return HotLoadStatus.model_validate(await http.request_json("GET", self._path))

    async def _load_one(self, http: HttpClient, identity: str, previous: str | None) -> HotLoadStatus:
        body = {"identity": identity, "reset_prompt_cache": True, "mode": self.mode,
                "incremental_snapshot_metadata": {"previous_snapshot_identity": previous} if previous else None}
        answer = await http.request_json("POST", self._path, json=body, timeout=self.timeout_s)
        # An ASYNC load answers once every replica has swapped, so its answer usually settles it.
        return await wait_until_serving(lambda: self._status(http), identity, self.timeout_s,
                                        where=f"deployment {self.deployment_id}",
                                        first=HotLoadStatus.model_validate(answer), poll_s=_POLL_S,
                                        field="model_path")
