"""The models of one trainer worker: admission (names, caps, reuse), seq-ordered submissions, latest state."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firetitan.checkpoints import SnapshotStore, TrainStateStore, make_identity, validate_name
from firetitan.checkpoints.train_state import LatestStateStore
from firetitan.errors import ConflictError, FiretitanError, InvalidRequestError, NotFoundError
from firetitan.logging import get_logger
from firetitan.models import BUILTIN_MODELS, is_builtin, model_config, resolve_model_name
from firetitan.server.trainer import schemas as s
from firetitan.server.trainer.batch import prepare_batch
from firetitan.server.trainer.engine import ModelSpec, TrainerEngine, lora_target_modules
from firetitan.server.trainer.queue import FutureRecord, FutureStore, RequestQueue
from firetitan.types import LoraConfig

log = get_logger("firetitan.server.trainer")

# Tinker model ids ("<session>:train:<n>") that were mapped onto the preloaded model, newest kept.
MAX_MODEL_ALIASES = 1024


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
    # Models one worker holds at once (the preloaded one included); create_model beyond it is a 409.
    max_models: int = 8
    # `create_model` loads local directories only under these roots (built-ins are always allowed).
    model_roots: tuple[Path, ...] = ()
    # Maps a requested name (e.g. a hosted alias) to a built-in or a local directory; None = identity.
    resolve_model: Callable[[str], str] | None = None
    # The preloaded (job) model saves its train state every N optimizer steps (0 = only on request
    # and at shutdown), keeping the newest `autosave_keep`.
    autosave_every: int = 10
    autosave_keep: int = 2
    # Builds the preloaded (job) model's engine: `(model_id, spec, store=, states=, futures=)`; None =
    # a plain TrainerEngine. A data-parallel job (--world-size N) passes the distributed factory.
    make_engine: Callable[..., TrainerEngine] | None = None
    # Where every model of this worker lives (a resolved device, never "auto") and its compute/snapshot dtype.
    device: str = "cpu"
    dtype: str = "float32"


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


def _same_model(a: ModelSpec, b: ModelSpec) -> bool:
    """Whether two specs build the same model (LoRA compared by its effective settings)."""
    def lora_key(lo: LoraConfig | None) -> Any:
        if lo is None:
            return None
        return (lo.rank, lo.effective_alpha, lo.seed or 0, lo.train_attn, lo.train_mlp, lo.train_unembed)

    return (a.base_model == b.base_model and a.forward_only == b.forward_only and a.seed == b.seed
            and lora_key(a.lora) == lora_key(b.lora))


class TrainerService:
    """The models of one worker, the shared future store and the job's latest train state."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.futures = FutureStore(settings.future_retention)
        self.models: dict[str, ModelSession] = {}
        self.aliases: OrderedDict[str, str] = OrderedDict()
        self.store = SnapshotStore(settings.store_dir)
        self.states = TrainStateStore(settings.state_dir)
        self.latest = LatestStateStore(settings.state_dir, keep=settings.autosave_keep)
        self.preloaded_id: str | None = None
        self._latest_saved_step = 0
        self._ids = itertools.count(1)

    # -- models
    def session(self, model_id: str) -> ModelSession:
        sess = self.models.get(self.aliases.get(model_id, model_id))
        if sess is None:
            raise NotFoundError(f"model_id {model_id!r} does not exist on this trainer (known: "
                                f"{sorted(self.models)})", field="model_id")
        return sess

    def admit_base_model(self, name: str) -> str:
        """The canonical built-in name or absolute directory `name` denotes, if this worker may load it.

        Built-ins always; the worker's own `--base-model`; otherwise only a directory under one of
        `model_roots` (resolved, so `..` and symlinks cannot escape). Anything else is a 400.
        """
        if self.settings.resolve_model is not None:
            resolved = self.settings.resolve_model(name)
            if resolved != name:  # an alias the operator put in the table: trusted like a built-in
                return resolve_model_name(resolved, field="base_model")
        if is_builtin(name):
            return resolve_model_name(name)
        if self.settings.base_model is not None and name == self.settings.base_model:
            return resolve_model_name(name)
        roots = [r.resolve() for r in self.settings.model_roots]
        try:
            path = Path(name).expanduser().resolve()
        except (OSError, ValueError, RuntimeError):
            path = None
        if path is None or not any(path.is_relative_to(root) for root in roots):
            where = ", ".join(map(str, roots)) or "none configured (start the trainer with --model-root DIR)"
            raise InvalidRequestError(
                f"base_model {name[:200]!r} is not a built-in model ({', '.join(BUILTIN_MODELS)}) nor a "
                f"directory under an allowed model root: {where}", field="base_model")
        return resolve_model_name(str(path), field="base_model")

    def create_model(self, req: s.CreateModelRequest, *, preload: bool = False) -> FutureRecord:
        base = resolve_model_name(req.base_model) if preload else self.admit_base_model(req.base_model)
        if req.lora_config is not None:
            lora_target_modules(req.lora_config)
        spec = ModelSpec(base_model=base, lora=req.lora_config, forward_only=self.settings.forward_only or req.forward_only,
                         seed=req.seed, device=self.settings.device, dtype=self.settings.dtype)
        reused = self._reuse_preloaded(req, spec)
        if reused is not None:
            return reused
        model_id = req.resolved_model_id or self._new_model_id()
        existing = self.models.get(model_id)
        if existing is not None:
            if existing.spec != spec:
                raise ConflictError(f"model_id {model_id!r} already exists with a different configuration",
                                    field="model_id")
            assert existing.created is not None
            return existing.created
        if len(self.models) >= self.settings.max_models:
            raise ConflictError(f"this trainer already holds {len(self.models)} models, its limit "
                                f"(--max-models {self.settings.max_models}); unload one first", field="base_model")
        try:
            config = model_config(base)
        except FiretitanError as exc:
            exc.field = "base_model"
            raise
        sess = ModelSession(model_id=model_id, spec=spec, vocab_size=int(config.vocab_size),
                            pad_id=int(getattr(config, "pad_token_id", None) or 0),
                            queue=RequestQueue(self.futures, model_id))
        self.models[model_id] = sess
        if preload:
            self.preloaded_id = model_id
        sess.queue.start()

        def build() -> dict[str, Any]:
            try:
                if preload and self.settings.make_engine is not None:
                    engine = self.settings.make_engine(model_id, spec, store=self.store, states=self.states,
                                                       futures=self.futures)
                else:
                    engine = TrainerEngine(model_id, spec, store=self.store, states=self.states)
                if preload:
                    self._restore_latest(engine)
                sess.engine = engine  # only now: get_info must not see the model before it is restored
            except FiretitanError as exc:
                sess.error = exc
                raise
            except Exception as exc:
                sess.error = ConflictError(f"{type(exc).__name__}: {exc}")
                raise
            return {"type": "create_model", **sess.engine.info()}

        sess.created = sess.queue.submit("create_model", build, session=None, seq_id=None)
        return sess.created

    def _reuse_preloaded(self, req: s.CreateModelRequest, spec: ModelSpec) -> FutureRecord | None:
        """A create_model that asks for the job's preloaded model gets it instead of a second copy."""
        if req.model_id is not None or self.preloaded_id is None:
            return None
        pre = self.models.get(self.preloaded_id)
        if pre is None or pre.created is None or not _same_model(pre.spec, spec):
            return None
        derived = req.resolved_model_id
        if derived is not None and derived != pre.model_id:
            # Later Tinker calls may address the model by "<session>:train:<n>" alone.
            self.aliases[derived] = pre.model_id
            while len(self.aliases) > MAX_MODEL_ALIASES:
                self.aliases.popitem(last=False)
        log.info("create_model_reused_preloaded", model_id=pre.model_id, requested=derived)
        return pre.created

    def _new_model_id(self) -> str:
        while True:
            candidate = f"{self.settings.job_id or 'model'}-{next(self._ids)}"
            if candidate not in self.models:
                return candidate

    async def unload(self, model_id: str) -> None:
        sess = self.models.get(self.aliases.get(model_id, model_id))
        if sess is None:
            raise NotFoundError(f"model_id {model_id!r} does not exist on this trainer", field="model_id")
        await sess.queue.close()
        del self.models[sess.model_id]
        for alias in [a for a, target in self.aliases.items() if target == sess.model_id]:
            del self.aliases[alias]
        if sess.model_id == self.preloaded_id:
            self.preloaded_id = None
        if sess.engine is not None:  # its background snapshot write finishes; its shm segments go
            await asyncio.to_thread(sess.engine.close)
        sess.engine = None
        gc.collect()
        log.info("model_unloaded", model_id=sess.model_id)

    async def close(self) -> None:
        """Stop every queue; the job's model saves its latest state first if it stepped since."""
        import anyio

        pre = self.models.get(self.preloaded_id or "")
        if pre is not None and pre.engine is not None:
            await pre.queue.close()
            await anyio.to_thread.run_sync(self._save_latest_if_behind, pre.engine)
        for model_id in list(self.models):
            await self.unload(model_id)

    # -- latest train state of the job's model
    def _restore_latest(self, engine: TrainerEngine) -> None:
        last = self.latest.last_known_step()
        path = self.latest.latest()
        if path is None and last == 0:
            return  # a fresh job
        if path is not None:
            try:
                engine.restore_latest(str(path), last)
            except FiretitanError as exc:
                log.warning("latest_state_unusable", path=str(path), error=str(exc))
                path = None
        if path is None:
            engine.restored_from_step, engine.steps_lost = 0, last
        self._latest_saved_step = engine.step
        log.warning("trainer_state_restored", model_id=engine.model_id, restored_from_step=engine.restored_from_step,
                    steps_lost=engine.steps_lost, path=None if path is None else str(path))

    def _after_step(self, engine: TrainerEngine) -> None:
        try:
            self.latest.record_step(engine.step)
            every = self.settings.autosave_every
            if every > 0 and engine.step % every == 0:
                self._save_latest(engine)
        except Exception:  # a failed autosave must not fail the step it follows
            log.exception("autosave_failed", model_id=engine.model_id, step=engine.step)

    def _save_latest(self, engine: TrainerEngine) -> dict[str, Any]:
        extra = {**engine.spec.as_extra(), "policy_version": engine.policy_version}
        self.latest.save(engine.model, engine.optimizer, engine.step, extra, writer=engine.state_writer)
        self._latest_saved_step = engine.step
        return {"type": "save_latest", "model_id": engine.model_id, "step": engine.step}

    def _save_latest_if_behind(self, engine: TrainerEngine) -> None:
        if engine.step > self._latest_saved_step and not engine.spec.forward_only:
            try:
                self._save_latest(engine)
                log.info("latest_state_saved_at_shutdown", model_id=engine.model_id, step=engine.step)
            except Exception:
                log.exception("shutdown_save_failed", model_id=engine.model_id)

    def save_latest(self, req: s.ModelRef) -> FutureRecord:
        sess = self.session(req.model_id)
        if sess.model_id != self.preloaded_id:
            raise InvalidRequestError(f"model_id {req.model_id!r}: only the job's preloaded model "
                                      f"({self.preloaded_id!r}) keeps a latest train state", field="model_id")
        self._refuse_forward_only(sess, "save_latest")
        return sess.queue.submit("save_latest", lambda: self._save_latest(sess.require_engine()),
                                 session=None, seq_id=None)

    # -- submissions
    def submit(self, req: s._Sequenced, kind: str, make_job: Any) -> FutureRecord:
        """Validate with `make_job(session) -> fn` and queue it in seq order (a refusal raises; the
        route then consumes the seq_id with `reject`)."""
        sess = self.session(req.model_id)
        known = sess.queue.known(req.session_id, req.seq_id)
        if known is not None:
            return known
        fn = make_job(sess)
        return sess.queue.submit(kind, fn, session=req.session_id, seq_id=req.seq_id)

    def reject(self, raw: Any, kind: str, error: FiretitanError) -> str | None:
        """Consume the seq_id of a refused submission when its model and seq id are readable, with a
        future that fails with `error`; returns that future's request id."""
        if not isinstance(raw, dict):
            return None
        model_id, seq_id, session = raw.get("model_id"), raw.get("seq_id"), raw.get("session_id")
        if not isinstance(model_id, str) or type(seq_id) is not int or not 0 <= seq_id < 2**63:
            return None
        if session is not None and (not isinstance(session, str) or len(session) > 128):
            return None
        sess = self.models.get(self.aliases.get(model_id, model_id))
        if sess is None:
            return None
        rec = sess.queue.reject(kind, error, session=session, seq_id=seq_id)
        return None if rec is None else rec.request_id

    def _refuse_forward_only(self, sess: ModelSession, what: str) -> None:
        if sess.spec.forward_only:
            raise InvalidRequestError(
                f"model_id {sess.model_id!r} is a forward-only reference model; {what} is not available",
                field="model_id")

    def forward_job(self, req: s.ForwardRequest | s.ForwardBackwardRequest, backward: bool) -> Callable[[ModelSession], Any]:
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

        return make_job

    def optim_step_job(self, req: s.OptimStepRequest) -> Callable[[ModelSession], Any]:
        def make_job(sess: ModelSession) -> Any:
            self._refuse_forward_only(sess, "optim_step")

            def run() -> dict[str, Any]:
                engine = sess.require_engine()
                out = engine.optim_step(req.adam_params)
                if sess.model_id == self.preloaded_id:
                    self._after_step(engine)
                return out

            return run

        return make_job

    def save_weights_job(self, req: s.SaveWeightsRequest) -> Callable[[ModelSession], Any]:
        def make_job(sess: ModelSession) -> Any:
            self._refuse_forward_only(sess, "save_weights")
            name = validate_name(req.path, field="name")
            if not req.overwrite and self.states.exists(name):
                raise ConflictError(f"name: a train state {name!r} already exists (pass overwrite=true)",
                                    field="name")
            return lambda: sess.require_engine().save_state(name, req.overwrite)

        return make_job

    def save_for_sampler_job(self, req: s.SaveWeightsForSamplerRequest) -> Callable[[ModelSession], Any]:
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

        return make_job

    def load_weights_job(self, req: s.LoadWeightsRequest) -> Callable[[ModelSession], Any]:
        def make_job(sess: ModelSession) -> Any:
            if req.optimizer:
                self._refuse_forward_only(sess, "loading optimizer state")
            name = state_name(req.path)
            # Existence is checked when the job runs: a save_state queued just before may create it.
            return lambda: sess.require_engine().load_state(name, req.optimizer)

        return make_job

    def health(self, detailed: bool) -> dict[str, Any]:
        if not detailed:  # a caller without the key learns only that the worker is alive
            return {"status": "ok"}
        return {
            "status": "ok",
            "forward_only": self.settings.forward_only,
            "futures": len(self.futures),
            "models": {
                mid: {"loaded": m.engine is not None, "error": None if m.error is None else str(m.error),
                      "waiting": m.queue.waiting(), "busy": m.queue.busy,
                      "step": None if m.engine is None else m.engine.step,
                      "snapshots": None if m.engine is None or m.engine.snapshots is None
                      else m.engine.snapshots.status(),
                      "busy_s": None if m.queue.busy_since is None
                      else round(time.monotonic() - m.queue.busy_since, 3)}
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

