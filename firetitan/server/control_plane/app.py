"""HTTP routes of the control plane: thin handlers over `ControlPlane` plus the worker gateways."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
from aiohttp import web

from firetitan.errors import ConflictError, InvalidRequestError, NotFoundError
from firetitan.models import aliases
from firetitan.names import check_name
from firetitan.server.common import error_json, json_response, make_app, parse_body
from firetitan.server.control_plane.controller import ControlPlane
from firetitan.server.control_plane.hotload import DEPLOYMENT_HEADER, deployment_from_header
from firetitan.server.control_plane.proxy import forward
from firetitan.server.control_plane.resources import (
    JOB_CREATING,
    JOB_RUNNING,
    TRAINER,
    CreateDeploymentRequest,
    CreateTrainerJobRequest,
    Deployment,
    TrainerJob,
    UpdateDeploymentRequest,
)
from firetitan.server.control_plane.shapes import SHAPE_VERSION, SHAPES, resolve_shape
from firetitan.server.control_plane.supervisor import WorkerKey
from firetitan.server.deployment.schemas import HOT_LOAD_PATH, HotLoadRequest
from firetitan.server.tinker_gateway import add_tinker_routes

CP_KEY = web.AppKey("control_plane", ControlPlane)
PROXY_KEY = web.AppKey("proxy_session", aiohttp.ClientSession)

_ID = "{rid:[^/:]+}"


def build_app(cp: ControlPlane) -> web.Application:
    app = make_app(cp.api_key)
    app[CP_KEY] = cp

    @web.middleware
    async def note_activity(request: web.Request, handler: Any) -> web.StreamResponse:
        cp.last_request = time.monotonic()
        return await handler(request)

    app.middlewares.append(note_activity)

    async def on_startup(app: web.Application) -> None:
        await cp.start()
        # Forwarded requests carry the caller's own credentials, so this session has none.
        app[PROXY_KEY] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def on_cleanup(app: web.Application) -> None:
        await app[PROXY_KEY].close()
        await cp.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    acct = "/v1/accounts/{account}"
    r = app.router
    r.add_get("/health", health)
    r.add_get("/v1/accounts", list_accounts)
    r.add_get(f"{acct}/rlorTrainerJobs", list_jobs)
    r.add_post(f"{acct}/rlorTrainerJobs", create_job)
    r.add_get(f"{acct}/rlorTrainerJobs/{_ID}", get_job)
    r.add_delete(f"{acct}/rlorTrainerJobs/{_ID}", delete_job)
    r.add_post(f"{acct}/rlorTrainerJobs/{_ID}:resume", resume_job)
    r.add_get(f"{acct}/rlorTrainerJobs/{_ID}/checkpoints", list_job_checkpoints)
    r.add_route("*", "/training/v1/rlorTrainerJobs/{account}/{rid}/{tail:.*}", trainer_gateway)
    r.add_get(f"{acct}/deployments", list_deployments)
    r.add_post(f"{acct}/deployments", create_deployment)
    r.add_get(f"{acct}/deployments/{_ID}", get_deployment)
    r.add_patch(f"{acct}/deployments/{_ID}", update_deployment)
    r.add_delete(f"{acct}/deployments/{_ID}", delete_deployment)
    r.add_post(f"{acct}/deployments/{_ID}/hot_load/v1/models/hot_load", hot_load)
    r.add_get(f"{acct}/deployments/{_ID}/hot_load/v1/models/hot_load", hot_load_status)
    r.add_post(HOT_LOAD_PATH, hot_load_by_header)
    r.add_get(HOT_LOAD_PATH, hot_load_by_header)
    r.add_post(f"{acct}/deployments/{_ID}/inference/v1/completions", inference)
    r.add_post(f"{acct}/deployments/{_ID}/v1/completions", inference)
    r.add_post("/inference/v1/completions", inference_by_model)
    r.add_post("/v1/completions", inference_by_model)
    r.add_get(f"{acct}/trainingShapes", list_shapes)
    r.add_get(f"{acct}/trainingShapes/{{shape}}", get_shape)
    r.add_get(f"{acct}/trainingShapes/{{shape}}/versions", list_shape_versions)
    r.add_get(f"{acct}/trainingShapes/{{shape}}/versions/{{version}}", get_shape_version)
    r.add_get(f"{acct}/checkpoints", list_checkpoints)
    r.add_get(f"{acct}/snapshots/{{identity}}", get_snapshot)
    add_tinker_routes(app, cp)
    return app


def _cp(request: web.Request) -> ControlPlane:
    return request.app[CP_KEY]


def _base(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def job_view(request: web.Request, job: TrainerJob) -> dict[str, Any]:
    """The stored record plus the gateway URL a client should use for the trainer."""
    account = job.name.split("/")[1]
    out = job.wire()
    out["serviceUrl"] = f"{_base(request)}/training/v1/rlorTrainerJobs/{account}/{job.job_id}"
    return out


def deployment_view(request: web.Request, dep: Deployment) -> dict[str, Any]:
    out = dep.wire()
    url = f"{_base(request)}/v1/{dep.name}"
    out.update(inferenceUrl=url, hotLoadApiUrl=url, currentSnapshotIdentity=dep.current_snapshot_identity,
               replicaCount=sum(1 for r in dep.replicas if r.state == "READY"))
    return out


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "jobs": len(_cp(request).jobs.list(None))})


async def list_accounts(request: web.Request) -> web.Response:
    return json_response({"accounts": [{"name": "accounts/local", "displayName": "local"}]})


# trainer jobs --------------------------------------------------------------------------------

async def list_jobs(request: web.Request) -> web.Response:
    jobs = _cp(request).jobs.list(request.match_info["account"])
    return json_response({"rlorTrainerJobs": [job_view(request, j) for j in jobs], "nextPageToken": ""})


async def create_job(request: web.Request) -> web.Response:
    body = await parse_body(request, CreateTrainerJobRequest)
    job = await _cp(request).jobs.create(
        request.match_info["account"], body,
        request.query.get("rlorTrainerJobId") or None, request.query.get("trainingShape") or None)
    return json_response(job_view(request, job))


async def get_job(request: web.Request) -> web.Response:
    return json_response(job_view(request, _cp(request).jobs.get(request.match_info["account"],
                                                                request.match_info["rid"])))


async def delete_job(request: web.Request) -> web.Response:
    job = await _cp(request).jobs.delete(request.match_info["account"], request.match_info["rid"])
    return json_response(job_view(request, job))


async def resume_job(request: web.Request) -> web.Response:
    job = await _cp(request).jobs.resume(request.match_info["account"], request.match_info["rid"])
    return json_response(job_view(request, job))


async def trainer_gateway(request: web.Request) -> web.StreamResponse:
    """Forward Tinker-protocol calls to the job's worker; counts as activity for the idle timer."""
    cp = _cp(request)
    account, job_id = request.match_info["account"], request.match_info["rid"]
    job = cp.jobs.get(account, job_id)
    if job.state == JOB_CREATING:
        return error_json(503, f"trainer job {job.name!r} is starting", type_name="APIConnectionError")
    if job.state != JOB_RUNNING or not job.trainer_url:
        raise ConflictError(f"trainer job {job.name!r} is not running (state {job.state}: {job.status.message})",
                            field="rlorTrainerJobId")
    tail = request.match_info["tail"]
    body = await _resolve_create_model(request, cp) if tail.endswith("create_model") else None
    with cp.jobs.activity(account, job_id):
        resp = await forward(request, f"{job.trainer_url}/{tail}", request.app[PROXY_KEY], body=body)
    key = WorkerKey(TRAINER, account, job_id)
    if resp.status == 503 and (reason := await cp.supervisor.confirm_exit(key)):
        # The worker died under this call: say so now (409 -> WorkerCrashedError in the SDK) rather than
        # let the client retry a 503 until the next health check notices. The job is marked failed
        # before the answer leaves, so a `resume` sent on this error always relaunches it.
        await cp.jobs.worker_lost(key, reason)
        raise ConflictError(f"trainer job {job.name!r} is not running: {reason}", field="rlorTrainerJobId")
    return resp


async def _resolve_create_model(request: web.Request, cp: ControlPlane) -> bytes | None:
    """The official SDK's `create_model` names the hosted base model it was given; the trainer only
    knows local models, so the gateway swaps in the alias table's target (None: forward unchanged)."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        return None  # the trainer answers the malformed body itself
    name = body.get("base_model") if isinstance(body, dict) else None
    if not isinstance(name, str) or not aliases.is_hosted_name(name):
        return None
    body["base_model"] = aliases.resolve_model_name(name, cp.layout.root, field="base_model")
    return json.dumps(body).encode()


async def list_job_checkpoints(request: web.Request) -> web.Response:
    cp = _cp(request)
    account, job_id = request.match_info["account"], request.match_info["rid"]
    job = cp.jobs.get(account, job_id)
    rows = _train_state_rows(job.name, cp.layout.trainer_state_dir(account, job_id))
    return json_response({"checkpoints": rows, "nextPageToken": ""})


def _train_state_rows(job_name: str, state_dir: Any) -> list[dict[str, Any]]:
    from firetitan.checkpoints import TrainStateStore

    if not state_dir.is_dir():
        return []
    rows = []
    for info in TrainStateStore(state_dir).list():
        rows.append({"name": f"{job_name}/checkpoints/{info.name}", "createTime": info.created_at.isoformat(),
                     "checkpointType": "CHECKPOINT_TYPE_TRAINING", "promotable": False, "step": info.step})
    return rows


# deployments ---------------------------------------------------------------------------------

async def list_deployments(request: web.Request) -> web.Response:
    deps = _cp(request).deployments.list(request.match_info["account"])
    return json_response({"deployments": [deployment_view(request, d) for d in deps], "nextPageToken": ""})


async def create_deployment(request: web.Request) -> web.Response:
    body = await parse_body(request, CreateDeploymentRequest)
    dep = await _cp(request).deployments.create(request.match_info["account"], body,
                                               request.query.get("deploymentId") or None)
    return json_response(deployment_view(request, dep))


async def get_deployment(request: web.Request) -> web.Response:
    dep = _cp(request).deployments.get(request.match_info["account"], request.match_info["rid"])
    return json_response(deployment_view(request, dep))


async def update_deployment(request: web.Request) -> web.Response:
    body = await parse_body(request, UpdateDeploymentRequest)
    dep = await _cp(request).deployments.update(request.match_info["account"], request.match_info["rid"], body)
    return json_response(deployment_view(request, dep))


async def delete_deployment(request: web.Request) -> web.Response:
    await _cp(request).deployments.delete(request.match_info["account"], request.match_info["rid"])
    return json_response({})


async def hot_load(request: web.Request) -> web.Response:
    body = await parse_body(request, HotLoadRequest)
    result = await _cp(request).hot_loads.load(request.match_info["account"], request.match_info["rid"], body)
    return json_response(result.model_dump(mode="json"))


async def hot_load_status(request: web.Request) -> web.Response:
    status = await _cp(request).hot_loads.status(request.match_info["account"], request.match_info["rid"])
    return json_response(status.model_dump(mode="json"))


async def hot_load_by_header(request: web.Request) -> web.Response:
    """The hosted gateway's root hot-load route: the deployment is named by the `fireworks-deployment`
    header (`accounts/<a>/deployments/<id>`), as the official SDK sends it."""
    account, deployment_id = deployment_from_header(request.headers.get(DEPLOYMENT_HEADER))
    hot_loads = _cp(request).hot_loads
    if request.method == "POST":
        body = await parse_body(request, HotLoadRequest)
        return json_response((await hot_loads.load(account, deployment_id, body)).model_dump(mode="json"))
    return json_response((await hot_loads.status(account, deployment_id)).model_dump(mode="json"))


async def inference(request: web.Request) -> web.StreamResponse:
    return await _route(request, request.match_info["account"], request.match_info["rid"], None)


async def inference_by_model(request: web.Request) -> web.StreamResponse:
    """Hosted-style `/inference/v1/completions` where `model` names `accounts/<a>/deployments/<id>`."""
    body = await request.read()
    try:
        model = json.loads(body).get("model", "")
    except (ValueError, AttributeError):
        raise InvalidRequestError("request body is not a JSON object", field="body") from None
    parts = str(model).split("/")
    if len(parts) < 4 or parts[0] != "accounts" or parts[2] != "deployments":
        raise InvalidRequestError(f"model {model!r} must name a deployment: accounts/<account>/deployments/<id>",
                                  field="model")
    check_name(parts[1], field="model")  # the same name rule as every path parameter
    check_name(parts[3], field="model")
    return await _route(request, parts[1], parts[3], body)


async def _route(request: web.Request, account: str, deployment_id: str, body: bytes | None) -> web.StreamResponse:
    """Send one inference request to the ready replica with the fewest requests in flight."""
    cp = _cp(request)
    ready = cp.deployments.ready_replicas(account, deployment_id)
    name = f"accounts/{account}/deployments/{deployment_id}"
    index = cp.router.choose(name, sorted(ready))
    if index is None:
        return error_json(503, f"deployment {name!r} has no ready replicas", type_name="APIConnectionError")
    tail = request.path.split(f"/deployments/{deployment_id}", 1)[-1] if "/deployments/" in request.path \
        else request.path
    with cp.router.track(name, index):
        resp = await forward(request, f"{ready[index]}{tail}", request.app[PROXY_KEY], body=body)
    if resp.status == 503:
        # A dead replica leaves the ready set now, so the client's retry goes to a live one.
        await cp.supervisor.confirm_exit(WorkerKey("replica", account, deployment_id, index))
    return resp


# shapes and checkpoints ----------------------------------------------------------------------

async def list_shapes(request: web.Request) -> web.Response:
    shapes = [{"name": s.name, "baseModel": s.base_model, "deploymentShape": s.deployment.name}
              for s in SHAPES.values()]
    return json_response({"trainingShapes": shapes, "nextPageToken": ""})


def _shape_name(request: web.Request) -> str:
    m = request.match_info
    return f"accounts/{m['account']}/trainingShapes/{m['shape']}"


async def get_shape(request: web.Request) -> web.Response:
    shape = resolve_shape(_shape_name(request), "trainingShape", _cp(request).layout.root)
    return json_response({"name": shape.name, "baseModel": shape.base_model,
                          "deploymentShape": shape.deployment.name,
                          "latestVersion": f"{shape.name}/versions/{SHAPE_VERSION}"})


async def list_shape_versions(request: web.Request) -> web.Response:
    shape = resolve_shape(_shape_name(request), "trainingShape", _cp(request).layout.root)
    return json_response({"trainingShapeVersions": [shape.profile()], "nextPageToken": ""})


async def get_shape_version(request: web.Request) -> web.Response:
    m = request.match_info
    shape = resolve_shape(f"{_shape_name(request)}/versions/{m['version']}", "trainingShape", _cp(request).layout.root)
    return json_response(shape.profile())


async def list_checkpoints(request: web.Request) -> web.Response:
    """Every sampler snapshot in the shared store, plus the train states of this account's jobs."""
    from firetitan.checkpoints import SnapshotStore

    cp = _cp(request)
    account = request.match_info["account"]
    job_filter = request.query.get("trainerJob")
    rows: list[dict[str, Any]] = []
    for job in cp.jobs.list(account):
        if job_filter in (None, job.job_id, job.name):
            rows += _train_state_rows(job.name, cp.layout.trainer_state_dir(account, job.job_id))
    if job_filter is None:
        kinds = {"base": "CHECKPOINT_TYPE_INFERENCE_BASE", "delta": "CHECKPOINT_TYPE_INFERENCE_ARC_V2",
                 "lora": "CHECKPOINT_TYPE_INFERENCE_LORA"}
        for m in SnapshotStore(cp.layout.store).list():
            rows.append({"name": f"accounts/{account}/checkpoints/{m.identity}", "identity": m.identity,
                         "createTime": m.created_at.isoformat(), "checkpointType": kinds[m.kind],
                         "promotable": m.kind != "delta", "baseModel": m.base_model,
                         "previousSnapshotIdentity": m.previous_snapshot_identity, "sizeBytes": m.size_bytes})
    return json_response({"checkpoints": rows, "nextPageToken": ""})


async def get_snapshot(request: web.Request) -> web.Response:
    """One sampler snapshot's manifest: its kind and, for a delta, the base it applies to."""
    from firetitan.checkpoints import SnapshotStore

    store = SnapshotStore(_cp(request).layout.store)
    identity = request.match_info["identity"]
    if not store.exists(identity):
        raise NotFoundError(f"no sampler snapshot with identity {identity!r}", field="identity")
    return json_response(store.manifest(identity).model_dump(mode="json", exclude={"files", "tensor_sha256",
                                                                                  "dtypes"}))
