"""The trainer worker's aiohttp routes: parse and validate, queue the work, long-poll the results."""

from __future__ import annotations

import asyncio
import gc
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from firetitan.checkpoints import SnapshotStore, TrainStateStore, make_identity, validate_name
from firetitan.errors import ConflictError, FiretitanError, InvalidRequestError, NotFoundError
from firetitan.logging import get_logger
from firetitan.models import DEFAULT_MODEL, model_config
from firetitan.server.common import json_response, make_app, parse_body
from firetitan.server.trainer import schemas as s
from firetitan.server.trainer.batch import prepare_batch
from firetitan.server.trainer.engine import ModelSpec, TrainerEngine, lora_target_modules
from firetitan.server.trainer.queue import FutureRecord, FutureStore, RequestQueue
from firetitan.types import LoraConfig

log = get_logger("firetitan.server.trainer")

# A long poll never holds a request longer than this (clients use a longer HTTP timeout).
MAX_POLL_SECONDS = 30.0
API = "/api/v1"


@dataclass
class TrainerSettings:
    store_dir: Path
    state_dir: Path
    base_model: str | None = None
    lora_rank: int = 0
    job_id: str | None = None
    forward_only: bool = False
    api_key: str | None = None
    future_retention: int = 4096


@dataclass
class ModelSession:
    """A model known to this worker; `engine` is None until its create job has run."""

    model_id: str
    spec: ModelSpec
    vocab_size: int
    pad_id: int
    queue: RequestQueue
    created: FutureRecord | None = None
    engine: TrainerEngine | None = None
    error: FiretitanError | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def require_engine(self) -> TrainerEngine:
        if self.engine is None:
            raise ConflictError(f"model_id {self.model_id!r} failed to load: {self.error}", field="model_id")
        return self.engine


class TrainerService:
    """The models of one worker and the shared future store."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.futures = FutureStore(settings.future_retention)
        self.models: dict[str, ModelSession] = {}
        self.store = SnapshotStore(settings.store_dir)
        self.states = TrainStateStore(settings.state_dir)
        self._ids = itertools.count(1)

    # -- models
    def session(self, model_id: str) -> ModelSession:
        sess = self.models.get(model_id)
        if sess is None:
            raise NotFoundError(f"model_id {model_id!r} does not exist on this trainer (known: "
                                f"{sorted(self.models)})", field="model_id")
        return sess

    def create_model(self, req: s.CreateModelRequest) -> FutureRecord:
        base = req.base_model or self.settings.base_model or DEFAULT_MODEL
        if req.lora_config is not None:
            lora_target_modules(req.lora_config)
        spec = ModelSpec(base_model=base, lora=req.lora_config, forward_only=self.settings.forward_only or req.forward_only, seed=req.seed)
        model_id = req.resolved_model_id or self._new_model_id()
        existing = self.models.get(model_id)
        if existing is not None:
            if existing.spec != spec:
                raise ConflictError(f"model_id {model_id!r} already exists with a different configuration",
                                    field="model_id")
            assert existing.created is not None
            return existing.created
        try:
            config = model_config(base)
        except FiretitanError as exc:
            exc.field = "base_model"
            raise
        sess = ModelSession(model_id=model_id, spec=spec, vocab_size=int(config.vocab_size),
                            pad_id=int(getattr(config, "pad_token_id", None) or 0),
                            queue=RequestQueue(self.futures, model_id))
        self.models[model_id] = sess
        sess.queue.start()

        def build() -> dict[str, Any]:
            try:
                sess.engine = TrainerEngine(model_id, spec, store=self.store, states=self.states)
            except FiretitanError as exc:
                sess.error = exc
                raise
            except Exception as exc:
                sess.error = ConflictError(f"{type(exc).__name__}: {exc}")
                raise
            return {"type": "create_model", **sess.engine.info()}

        sess.created = sess.queue.submit("create_model", build, session=None, seq_id=None)
        return sess.created

    def _new_model_id(self) -> str:
        while True:
            candidate = f"{self.settings.job_id or 'model'}-{next(self._ids)}"
            if candidate not in self.models:
                return candidate

    async def unload(self, model_id: str) -> None:
        sess = self.models.pop(model_id, None)
        if sess is None:
            raise NotFoundError(f"model_id {model_id!r} does not exist on this trainer", field="model_id")
        await sess.queue.close()
        sess.engine = None
        gc.collect()
        log.info("model_unloaded", model_id=model_id)

    async def close(self) -> None:
        for model_id in list(self.models):
            await self.unload(model_id)

    # -- submissions
    def submit(self, req: s._Sequenced, kind: str, make_job: Any) -> FutureRecord:
        """Validate with `make_job(session) -> fn` and queue it in seq order.

        A rejected submission still consumes its seq_id, so later submissions of the same client
        are not held back forever by the gap.
        """
        sess = self.session(req.model_id)
        known = sess.queue.lookup(req.session_id, req.seq_id)
        if known is not None:
            return self.futures.get(known)
        try:
            fn = make_job(sess)
        except BaseException:
            sess.queue.release(req.session_id, req.seq_id)
            raise
        return sess.queue.submit(kind, fn, session=req.session_id, seq_id=req.seq_id)

    def _refuse_forward_only(self, sess: ModelSession, what: str) -> None:
        if sess.spec.forward_only:
            raise InvalidRequestError(
                f"model_id {sess.model_id!r} is a forward-only reference model; {what} is not available",
                field="model_id")

    def forward(self, req: s.ForwardRequest | s.ForwardBackwardRequest, backward: bool) -> FutureRecord:
        inp = req.forward_input if isinstance(req, s.ForwardRequest) else req.forward_backward_input

        def make_job(sess: ModelSession) -> Any:
            if backward:
                self._refuse_forward_only(sess, "forward_backward")
            if req.disable_adapter and not sess.spec.is_lora:
                raise InvalidRequestError("disable_adapter: the model is full-parameter; it has no adapter",
                                          field="disable_adapter")
            batch = prepare_batch(inp.data, inp.loss_fn, inp.loss_fn_config, sess.vocab_size, sess.pad_id)
            return lambda: sess.require_engine().forward(batch, backward=backward,
                                                         disable_adapter=req.disable_adapter)

        return self.submit(req, "forward_backward" if backward else "forward", make_job)

    def optim_step(self, req: s.OptimStepRequest) -> FutureRecord:
        def make_job(sess: ModelSession) -> Any:
            self._refuse_forward_only(sess, "optim_step")
            return lambda: sess.require_engine().optim_step(req.adam_params)

        return self.submit(req, "optim_step", make_job)

    def save_weights(self, req: s.SaveWeightsRequest) -> FutureRecord:
        def make_job(sess: ModelSession) -> Any:
            self._refuse_forward_only(sess, "save_weights")
            name = validate_name(req.path, field="name")
            if not req.overwrite and self.states.exists(name):
                raise ConflictError(f"name: a train state {name!r} already exists (pass overwrite=true)",
                                    field="name")
            return lambda: sess.require_engine().save_state(name, req.overwrite)

        return self.submit(req, "save_weights", make_job)

    def save_weights_for_sampler(self, req: s.SaveWeightsForSamplerRequest) -> FutureRecord:
        def make_job(sess: ModelSession) -> Any:
            self._refuse_forward_only(sess, "save_weights_for_sampler")
            if req.client_suffix is not None:
                make_identity(req.path, req.client_suffix, field="name")
            else:
                validate_name(req.path, field="name")
            if sess.spec.is_lora and req.checkpoint_type == "delta":
                raise InvalidRequestError("checkpoint_type: LoRA snapshots are always adapters; 'delta' is "
                                          "only for full-parameter models", field="checkpoint_type")
            return lambda: sess.require_engine().save_for_sampler(req.path, req.client_suffix,
                                                                  req.checkpoint_type)

        return self.submit(req, "save_weights_for_sampler", make_job)

    def load_weights(self, req: s.LoadWeightsRequest) -> FutureRecord:
        def make_job(sess: ModelSession) -> Any:
            if req.optimizer:
                self._refuse_forward_only(sess, "loading optimizer state")
            name = state_name(req.path)
            # Existence is checked when the job runs: a save_state queued just before may create it.
            return lambda: sess.require_engine().load_state(name, req.optimizer)

        return self.submit(req, "load_weights", make_job)

    async def info(self, model_id: str) -> dict[str, Any]:
        sess = self.session(model_id)
        if sess.engine is None and sess.created is not None:
            await asyncio.wait_for(sess.created.done.wait(), timeout=600)
        return sess.require_engine().info()

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "forward_only": self.settings.forward_only,
            "futures": len(self.futures),
            "models": {
                mid: {"loaded": m.engine is not None, "error": None if m.error is None else str(m.error),
                      "waiting": m.queue.waiting(), "busy": m.queue.busy,
                      "step": None if m.engine is None else m.engine.step}
                for mid, m in self.models.items()
            },
        }


def state_name(path: str) -> str:
    """The train state name in `name` or `tinker://<run>/weights/<name>` (syntax only)."""
    name = path
    if path.startswith("tinker://"):
        parts = path[len("tinker://"):].split("/")
        if len(parts) != 3 or parts[1] != "weights":
            raise InvalidRequestError(f"path {path!r} is not a train state path (tinker://<run>/weights/<name>)",
                                      field="path")
        name = parts[2]
    return validate_name(name, field="path")


def _accepted(rec: FutureRecord) -> web.Response:
    return json_response({"request_id": rec.request_id, "model_id": rec.model_id})


def build_app(settings: TrainerSettings) -> web.Application:
    service = TrainerService(settings)
    app = make_app(settings.api_key)
    app["service"] = service
    routes = web.RouteTableDef()

    @routes.get(f"{API}/healthz")
    @routes.get("/health")
    async def healthz(request: web.Request) -> web.Response:
        return json_response(service.health())

    @routes.post(f"{API}/create_model")
    async def create_model(request: web.Request) -> web.Response:
        return _accepted(service.create_model(await parse_body(request, s.CreateModelRequest)))

    @routes.post(f"{API}/get_info")
    async def get_info(request: web.Request) -> web.Response:
        req = await parse_body(request, s.ModelRef)
        return json_response(await service.info(req.model_id))

    @routes.post(f"{API}/unload_model")
    async def unload_model(request: web.Request) -> web.Response:
        req = await parse_body(request, s.ModelRef)
        await service.unload(req.model_id)
        return json_response({"model_id": req.model_id, "type": "unload_model"})

    @routes.post(f"{API}/list_checkpoints")
    async def list_checkpoints(request: web.Request) -> web.Response:
        req = await parse_body(request, s.ModelRef)
        service.session(req.model_id)
        names = [info.name for info in service.states.list() if info.name]
        return json_response({"checkpoints": names})

    @routes.post(f"{API}/forward")
    async def forward(request: web.Request) -> web.Response:
        return _accepted(service.forward(await parse_body(request, s.ForwardRequest), backward=False))

    @routes.post(f"{API}/forward_backward")
    async def forward_backward(request: web.Request) -> web.Response:
        req = await parse_body(request, s.ForwardBackwardRequest)
        return _accepted(service.forward(req, backward=not req.forward_only))

    @routes.post(f"{API}/optim_step")
    async def optim_step(request: web.Request) -> web.Response:
        return _accepted(service.optim_step(await parse_body(request, s.OptimStepRequest)))

    @routes.post(f"{API}/save_weights")
    async def save_weights(request: web.Request) -> web.Response:
        return _accepted(service.save_weights(await parse_body(request, s.SaveWeightsRequest)))

    @routes.post(f"{API}/save_weights_for_sampler")
    async def save_weights_for_sampler(request: web.Request) -> web.Response:
        req = await parse_body(request, s.SaveWeightsForSamplerRequest)
        return _accepted(service.save_weights_for_sampler(req))

    @routes.post(f"{API}/load_weights")
    async def load_weights(request: web.Request) -> web.Response:
        return _accepted(service.load_weights(await parse_body(request, s.LoadWeightsRequest)))

    @routes.post(f"{API}/release_seq")
    async def release_seq(request: web.Request) -> web.Response:
        req = await parse_body(request, s.ReleaseSeqRequest)
        service.session(req.model_id).queue.release(req.session_id, req.seq_id)
        return json_response({"released": req.seq_id})

    @routes.post(f"{API}/retrieve_future")
    async def retrieve_future(request: web.Request) -> web.Response:
        req = await parse_body(request, s.RetrieveFutureRequest)
        rec = service.futures.get(req.request_id)
        wait = MAX_POLL_SECONDS if req.timeout is None else min(req.timeout, MAX_POLL_SECONDS)
        try:
            await asyncio.wait_for(rec.done.wait(), timeout=wait)
        except TimeoutError:
            return json_response({"type": "try_again", "request_id": rec.request_id, "queue_state": "active"})
        assert rec.body is not None
        return json_response(rec.body, status=rec.status)

    app.add_routes(routes)

    async def preload(app: web.Application) -> None:
        if settings.base_model:
            lora = LoraConfig(rank=settings.lora_rank) if settings.lora_rank > 0 else None
            service.create_model(s.CreateModelRequest(base_model=settings.base_model, lora_config=lora,
                                                      model_id=settings.job_id or "default"))

    async def shutdown(app: web.Application) -> None:
        await service.close()

    app.on_startup.append(preload)
    app.on_cleanup.append(shutdown)
    return app
