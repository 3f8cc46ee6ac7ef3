"""Cleanup when a service client closes: delete or scale down only what it created, as its config says."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

from firetitan.client.service_resources import ServiceResources
from firetitan.client.training import TrainingClient
from firetitan.errors import NotFoundError
from firetitan.logging import get_logger

log = get_logger("firetitan.client.service")


async def delete_reference(resources: ServiceResources) -> None:
    """Delete the service-owned reference trainer now, if the config lets close() delete it."""
    if (resources.reference_created and resources.reference_job_id
            and resources.config.cleanup_reference_trainer_on_close):
        http = await resources.connect()
        with contextlib.suppress(NotFoundError):
            await http.request_json("DELETE", resources.acct(f"/rlorTrainerJobs/{resources.reference_job_id}"))
        resources.reference_created = False


async def close_resources(resources: ServiceResources, clients: Iterable[TrainingClient]) -> None:
    """Attempt every cleanup step, close the clients and the connection; then raise the first error."""
    errors: list[BaseException] = []
    cfg = resources.config
    http = resources.http

    async def step(what: str, method: str, path: str, body: Any = None) -> None:
        assert http is not None
        try:
            await http.request_json(method, resources.acct(path), json=body, timeout=120.0)
            log.info("cleanup", action=what, path=path)
        except NotFoundError:
            pass
        except Exception as exc:
            errors.append(exc)

    if http is not None:
        if resources.reference_created and resources.reference_job_id and cfg.cleanup_reference_trainer_on_close:
            await step("delete_reference", "DELETE", f"/rlorTrainerJobs/{resources.reference_job_id}")
        dep_id = resources.deployment_id
        if resources.deployment_created and dep_id and cfg.cleanup_deployment_on_close == "scale_to_zero":
            await step("scale_to_zero", "PATCH", f"/deployments/{dep_id}",
                       {"minReplicaCount": 0, "maxReplicaCount": 0})
        elif resources.deployment_created and dep_id and cfg.cleanup_deployment_on_close == "delete":
            await step("delete_deployment", "DELETE", f"/deployments/{dep_id}")
        elif (not resources.deployment_created and dep_id and resources.replicas_found is not None
              and cfg.cleanup_deployment_on_close is not None):
            await step("restore_replicas", "PATCH", f"/deployments/{dep_id}",
                       {"minReplicaCount": resources.replicas_found, "maxReplicaCount": resources.replicas_found})
        job_id = resources.trainer_job_id
        if resources.trainer_created and job_id and cfg.cleanup_trainer_on_close:
            await step("delete_trainer", "DELETE", f"/rlorTrainerJobs/{job_id}")
    for client in clients:
        with contextlib.suppress(Exception):
            await client.close_async()
    if http is not None:
        await http.close()
    if errors:
        raise errors[0]
