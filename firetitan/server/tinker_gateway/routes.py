"""The Tinker API (`/api/v1/...`) on the control plane's own URL, so `tinker.ServiceClient(base_url=...)` works."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from firetitan.checkpoints import make_identity
from firetitan.errors import InvalidRequestError
from firetitan.server.common import json_response
from firetitan.server.control_plane.controller import ControlPlane
from firetitan.server.tinker_gateway import wire
from firetitan.server.tinker_gateway.futures import Failure, Outcome
from firetitan.server.tinker_gateway.gateway import POLL_S, Model, Snapshot, TinkerGateway, parse_tinker_path
from firetitan.server.tinker_gateway.sampling import DeploymentPool, sample

GATEWAY_KEY = web.AppKey("tinker_gateway", TinkerGateway)
POOL_KEY = web.AppKey("tinker_pool", DeploymentPool)
API = "/api/v1"

# Server feature flags for the SDK (`client/config`); anything left out keeps the SDK default.
# zstd-compressed forward_backward bodies stay off: the gateway reads plain protobuf only.
CLIENT_CONFIG = {"proto_compress_fwdbwd": False, "sample_use_retrieve_futures": False,
                 "custom_loss_server_side": False, "sample_join_sampling_session": False,
                 "use_pyqwest_transport": False}


def add_tinker_routes(app: web.Application, cp: ControlPlane) -> None:
    """Mount the Tinker API on the control plane's app (the one hook-up line in app.py)."""
    gw = TinkerGateway(cp)
    pool = DeploymentPool(cp)
    app[GATEWAY_KEY], app[POOL_KEY] = gw, pool
    gw.pool = pool

    async def on_startup(app: web.Application) -> None:
        gw.start()

    async def on_cleanup(app: web.Application) -> None:
        await gw.close()
        await pool.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.insert(0, on_cleanup)
    r = app.router
    r.add_post(f"{API}/client/config", lambda req: _ok(CLIENT_CONFIG))
    r.add_post(f"{API}/client/dynamic_config", lambda req: _ok({}))
    r.add_post(f"{API}/telemetry", lambda req: _ok({"status": "accepted"}))
    r.add_get(f"{API}/get_server_capabilities", capabilities)
    r.add_post(f"{API}/create_session", create_session)
    r.add_post(f"{API}/session_heartbeat", heartbeat)
    r.add_post(f"{API}/sessions/{{sid}}/finish", finish)
    r.add_post(f"{API}/create_model", create_model)
    r.add_post(f"{API}/get_info", get_info)
    r.add_post(f"{API}/forward_backward", forward_backward)
    r.add_post(f"{API}/forward", forward_backward)
    r.add_post(f"{API}/optim_step", optim_step)
    r.add_post(f"{API}/save_weights", save_weights)
    r.add_post(f"{API}/save_weights_for_sampler", save_weights_for_sampler)
    r.add_post(f"{API}/load_weights", load_weights)
    r.add_post(f"{API}/retrieve_future", retrieve_future)
    r.add_post(f"{API}/create_sampling_session", create_sampling_session)
    r.add_get(f"{API}/samplers/{{sid}}", get_sampler)
    r.add_post(f"{API}/asample", asample)


async def _ok(body: dict[str, Any]) -> web.Response:
    return json_response(body)


def _gw(request: web.Request) -> TinkerGateway:
    return request.app[GATEWAY_KEY]


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}", field="body") from exc
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object", field="body")
    return body


def _future(rid: str, model_id: str | None = None, **extra: Any) -> web.Response:
    return json_response({"request_id": rid, "model_id": model_id, **extra})


async def capabilities(request: web.Request) -> web.Response:
    from firetitan.server.control_plane.shapes import SHAPES

    models = sorted({s.base_model for s in SHAPES.values()})
    return json_response({"supported_models": [{"model_name": m, "trainable": True, "sampleable": True}
                                               for m in models]})


async def create_session(request: web.Request) -> web.Response:
    await _json(request)
    return json_response({"type": "create_session", "session_id": _gw(request).create_session()})


async def heartbeat(request: web.Request) -> web.Response:
    body = await _json(request)
    sess = _gw(request).sessions.get(str(body.get("session_id")))
    if sess is None:  # the SDK reads 410 as "this session is over"
        return web.json_response({"error": "session finished or unknown"}, status=410)
    _gw(request).touch(sess.session_id)
    return json_response({"type": "session_heartbeat"})


async def finish(request: web.Request) -> web.Response:
    await _gw(request).finish_session(request.match_info["sid"])
    return json_response({})


async def create_model(request: web.Request) -> web.Response:
    gw = _gw(request)
    body = await _json(request)
    lora = body.get("lora_config") or {}
    rank = int(lora.get("rank") or 0)
    model = await gw.create_model(str(body.get("session_id")), int(body.get("model_seq_id") or 0),
                                  str(body.get("base_model")), rank)

    async def run() -> Outcome:
        await gw.load_info(model)
        return Outcome(json={"type": "create_model", "model_id": model.model_id})

    return _future(gw.futures.spawn(run()), model.model_id)


async def get_info(request: web.Request) -> web.Response:
    gw = _gw(request)
    body = await _json(request)
    try:
        model = gw.model(str(body.get("model_id")))
    except Failure as exc:
        raise InvalidRequestError(exc.message, field="model_id") from None
    if not model.info:
        await gw.load_info(model)
    return json_response(gw.info_view(model))


def _fb_outcome(body: dict[str, Any]) -> Outcome:
    return Outcome(json=body, proto=wire.forward_backward_output_to_proto(body))


async def forward_backward(request: web.Request) -> web.Response:
    gw = _gw(request)
    if wire.PROTO in request.headers.get("Content-Type", ""):
        if request.headers.get("Content-Encoding", "identity") not in ("identity", ""):
            raise InvalidRequestError("Content-Encoding: compressed bodies are not accepted (client/config "
                                      "leaves proto_compress_fwdbwd off)", field="Content-Encoding")
        raw = await request.read()
        model_id, seq_id = wire.proto_address(raw)
        try:
            body, _ = wire.forward_backward_from_proto(raw)
        except InvalidRequestError as exc:
            if model_id is None or model_id not in gw.models:
                raise
            # Readable address, bad content: consume the seq id so the client's next call still runs.
            await gw.release(gw.models[model_id], seq_id)
            return _future(gw.futures.failed(exc.message), model_id)
    else:
        body = await _json(request)
        if request.path.endswith("/forward"):
            body = {**body, "forward_backward_input": body.pop("forward_input", None), "forward_only": True}
    model_id = str(body.get("model_id"))
    try:
        model = gw.model(model_id)
    except Failure as exc:
        return _future(gw.futures.failed(exc.message), model_id)
    return _future(await gw.submit(model, "forward_backward", body, _fb_outcome), model_id)


async def _sequenced(request: web.Request) -> tuple[TinkerGateway, Model | None, dict[str, Any], str | None]:
    gw = _gw(request)
    body = await _json(request)
    model_id = body.get("model_id")
    try:
        return gw, gw.model(str(model_id)), body, None
    except Failure as exc:
        return gw, None, body, gw.futures.failed(exc.message)


async def optim_step(request: web.Request) -> web.Response:
    gw, model, body, failed = await _sequenced(request)
    if model is None:
        return _future(str(failed), body.get("model_id"))
    body.setdefault("adam_params", body.pop("optimizer_params", None) or {})

    def post(reply: dict[str, Any]) -> Outcome:
        metrics = {k: float(v) for k, v in (reply.get("metrics") or {}).items() if isinstance(v, int | float)}
        return Outcome(json={"type": "optim_step", "metrics": metrics})

    return _future(await gw.submit(model, "optim_step", body, post), model.model_id)


async def save_weights(request: web.Request) -> web.Response:
    gw, model, body, failed = await _sequenced(request)
    if model is None:
        return _future(str(failed), body.get("model_id"))
    name = body.get("path") or f"state-{body.get('seq_id', 0)}"
    path = f"tinker://{model.model_id}/weights/{name}"
    post = lambda reply: Outcome(json={"type": "save_weights", "path": path})  # noqa: E731
    return _future(await gw.submit(model, "save_weights", {**body, "path": name}, post), model.model_id)


async def save_weights_for_sampler(request: web.Request) -> web.Response:
    gw, model, body, failed = await _sequenced(request)
    if model is None:
        return _future(str(failed), body.get("model_id"))
    name = body.get("path")
    sampler_seq = body.get("sampling_session_seq_id")
    unnamed = not name
    if unnamed:  # save_weights_and_get_sampling_client: an ephemeral snapshot behind a sampler id
        name = f"ephemeral-{body.get('seq_id', 0)}-{sampler_seq}"
    path = f"tinker://{model.model_id}/sampler_weights/{name}"

    def post(reply: dict[str, Any]) -> Outcome:
        snap = Snapshot(str(reply["path"]), model.base_model, model.model_id, reply.get("policy_version"))
        gw.remember_snapshot(path, snap)
        if not unnamed:
            return Outcome(json={"type": "save_weights_for_sampler", "path": path})
        sid = f"{model.session_id}:sample:{sampler_seq}"
        gw.remember_sampler(sid, snap)
        return Outcome(json={"type": "save_weights_for_sampler", "sampling_session_id": sid})

    worker_body = {"seq_id": body.get("seq_id"), "path": name, "client_suffix": model.suffix}
    return _future(await gw.submit(model, "save_weights_for_sampler", worker_body, post), model.model_id)


async def load_weights(request: web.Request) -> web.Response:
    gw = _gw(request)
    body = await _json(request)
    path = str(body.get("path"))
    optimizer = bool(body.get("optimizer"))
    try:
        src_id, name = parse_tinker_path(path, "weights")
    except Failure as exc:
        return _future(gw.futures.failed(exc.message), body.get("model_id"))
    if body.get("model_id") is None:  # create-via-load: a new training run starting from this state
        try:
            base, rank = gw.state_config(src_id, name)
        except Failure as exc:
            return _future(gw.futures.failed(exc.message))
        model = await gw.create_model(str(body.get("session_id")), int(body.get("model_seq_id") or 0),
                                      str(body.get("base_model") or base), rank)

        async def create_via_load() -> Outcome:
            await gw.load_info(model)
            gw.copy_state(src_id, name, model)
            await gw.run_and_wait(model, "load_weights", {"path": name, "optimizer": optimizer})
            return Outcome(json={"type": "load_weights", "path": path, "model_id": model.model_id})

        return _future(gw.futures.spawn(create_via_load()), model.model_id)
    try:
        model = gw.model(str(body["model_id"]))
        gw.copy_state(src_id, name, model)
    except Failure as exc:
        return _future(gw.futures.failed(exc.message), body.get("model_id"))
    post = lambda reply: Outcome(json={"type": "load_weights", "path": path, "model_id": model.model_id})  # noqa: E731
    worker_body = {"seq_id": body.get("seq_id"), "path": name, "optimizer": optimizer}
    return _future(await gw.submit(model, "load_weights", worker_body, post), model.model_id)


async def retrieve_future(request: web.Request) -> web.StreamResponse:
    body = await _json(request)
    rid = str(body.get("request_id"))
    task = _gw(request).futures.get(rid)
    try:
        outcome = await asyncio.wait_for(asyncio.shield(task), timeout=POLL_S)
    except TimeoutError:
        return json_response({"type": "try_again", "request_id": rid, "queue_state": "active"})
    except Failure as exc:
        return json_response({"error": exc.message, "category": exc.category})
    except Exception as exc:  # a gateway bug still answers the future instead of hanging the client
        return json_response({"error": f"{type(exc).__name__}: {exc}", "category": "server"})
    if outcome.proto is not None and wire.PROTO in request.headers.get("Accept", ""):
        return web.Response(body=outcome.proto, content_type=wire.PROTO)
    return json_response(outcome.json or {})


def _sampler_target(gw: TinkerGateway, model_path: str | None, base_model: str | None) -> Snapshot | str:
    if model_path:
        snap = gw.snapshots.get(model_path)
        if snap is not None:
            return snap
        model_id, name = parse_tinker_path(model_path, "sampler_weights")
        model = gw.model(model_id)
        return Snapshot(make_identity(name, model.suffix), model.base_model, model_id, None)
    if not base_model:
        raise Failure("create_sampling_session: give model_path (tinker://...) or base_model")
    return base_model


async def create_sampling_session(request: web.Request) -> web.Response:
    gw = _gw(request)
    body = await _json(request)
    session_id = str(body.get("session_id"))
    try:
        target = _sampler_target(gw, body.get("model_path"), body.get("base_model"))
    except Failure as exc:
        raise InvalidRequestError(exc.message, field="model_path") from None
    sid = f"{session_id}:sample:{body.get('sampling_session_seq_id', 0)}"
    gw.remember_sampler(sid, target)
    return json_response({"type": "create_sampling_session", "sampling_session_id": sid})


async def get_sampler(request: web.Request) -> web.Response:
    gw = _gw(request)
    sid = request.match_info["sid"]
    target = gw.samplers.get(sid)
    if target is None:
        raise InvalidRequestError(f"sampler {sid!r} is unknown", field="sampler_id")
    if isinstance(target, Snapshot):
        path = next((p for p, s in gw.snapshots.items() if s is target), None)
        return json_response({"sampler_id": sid, "base_model": target.base_model, "model_path": path})
    return json_response({"sampler_id": sid, "base_model": target, "model_path": None})


async def asample(request: web.Request) -> web.Response:
    gw, pool = _gw(request), request.app[POOL_KEY]
    body = await _json(request)
    n = int(body.get("num_samples") or 1)
    sid = body.get("sampling_session_id")
    seq_ids = [f"{sid or 'sample'}:{body.get('seq_id', 0)}:{i}" for i in range(n)]
    try:
        target = gw.samplers[sid] if sid in gw.samplers else _sampler_target(
            gw, body.get("model_path"), body.get("base_model"))
        prompt = [t for c in (body.get("prompt") or {}).get("chunks", []) for t in c.get("tokens", [])]
    except (Failure, KeyError) as exc:
        return _future(gw.futures.failed(str(getattr(exc, "message", exc))), sample_sequence_ids=seq_ids)

    async def run() -> Outcome:
        prompt_lps = await _prompt_logprobs(gw, target, prompt) if body.get("prompt_logprobs") else None
        dep_id = await pool.acquire(target, str(sid or "").split(":")[0])
        try:
            seqs = await sample(gw.cp, dep_id, prompt, n, body.get("sampling_params") or {})
        finally:
            pool.release(dep_id)
        json_seqs = [{**s, "stop_reason": s["stop_reason"]} for s in seqs]
        return Outcome(json={"type": "sample", "sequences": json_seqs, "prompt_logprobs": prompt_lps},
                       proto=wire.sample_response_to_proto(seqs, prompt_lps))

    return _future(gw.futures.spawn(run()), sample_sequence_ids=seq_ids)


async def _prompt_logprobs(gw: TinkerGateway, target: Snapshot | str, prompt: list[int]) -> list[float | None]:
    """Prompt logprobs by a forward pass on the trainer that saved the snapshot, while it still holds
    exactly those weights (same policy version); otherwise a clear failure."""
    if not isinstance(target, Snapshot) or target.model_id not in gw.models:
        raise Failure("prompt logprobs need the live training run that saved this snapshot "
                      "(base-model and orphaned samplers cannot score prompts here)")
    model = gw.models[target.model_id]
    info = await gw.load_info(model)
    if target.policy_version is not None and info.get("policy_version") != target.policy_version:
        raise Failure(f"prompt logprobs: run {model.model_id!r} has trained past this snapshot "
                      f"(policy version {info.get('policy_version')} vs {target.policy_version})")
    if len(prompt) < 2:
        return [None] * len(prompt)
    datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": prompt[:-1]}]},
             "loss_fn_inputs": {"target_tokens": {"data": prompt[1:], "dtype": "int64", "shape": [len(prompt) - 1]}}}
    reply = await gw.run_and_wait(model, "forward", {"forward_input": {"data": [datum],
                                                                       "loss_fn": "cross_entropy"}})
    from firetitan.types import TensorData

    logprobs = TensorData.model_validate(reply["loss_fn_outputs"][0]["logprobs"]).to_numpy().tolist()
    return [None, *logprobs]
