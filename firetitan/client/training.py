"""`TrainingClient`: drives one model on a trainer worker over HTTP (Tinker-style, futures, seq ordering).

Every operation gets the next `seq_id` when it is *called*, is submitted in that order (a turn gate),
executes on the trainer in that order, and returns an `APIFuture` at once. So
`fb = tc.forward_backward(...); opt = tc.optim_step(...)` followed by `fb.result(); opt.result()`
gives exactly what awaiting each call in turn gives. `foo_async(...)` is a coroutine that returns
the result of `foo(...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pydantic

from firetitan.checkpoints.identity import new_client_suffix
from firetitan.client.custom_loss import CustomLossFn, ce_datum, linearize, unsupported_options
from firetitan.client.http import HttpClient
from firetitan.errors import ConflictError, FiretitanError, InvalidRequestError, WorkerCrashedError
from firetitan.futures import (
    APIFuture,
    add_shutdown_hook,
    failed,
    get_background_loop,
    run_coroutine,
    run_sync,
)
from firetitan.logging import get_logger
from firetitan.types import (
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadWeightsResponse,
    LoraConfig,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    coerce_adam_params,
    coerce_datum,
)

log = get_logger("firetitan.client.training")

API = "/api/v1"


class TrainerInfo(GetInfoResponse):
    """`get_info()` result: Tinker's fields plus the trainer's counters."""

    lora_alpha: float | None = None
    num_params: int | None = None
    num_trainable_params: int | None = None
    step: int = 0
    policy_version: int = 0
    forward_only: bool = False
    vocab_size: int | None = None
    last_base_snapshot: str | None = None
    # Set when a restarted trainer restored the job's latest saved train state: the step it resumed
    # from, and how many steps past it were lost with the crash.
    restored_from_step: int | None = None
    steps_lost: int | None = None


class SamplerSnapshot(SaveWeightsForSamplerResponse):
    """`save_weights_for_sampler()` result; `path` is the public snapshot identity."""

    type: str = "save_weights_for_sampler"
    checkpoint_type: str | None = None
    previous_snapshot_identity: str | None = None
    size_bytes: int | None = None
    full_size_bytes: int | None = None
    checksum: str | None = None
    step: int | None = None
    policy_version: int | None = None


class _TurnGate:
    """Lets submissions through in seq order. A seq that is never submitted must still be finished."""

    def __init__(self, first: int) -> None:
        self._done = first - 1
        self._finished: set[int] = set()
        self._waiters: dict[int, asyncio.Future[None]] = {}

    async def wait(self, seq: int) -> None:
        if seq - 1 <= self._done:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[seq] = fut
        try:
            await fut
        finally:
            self._waiters.pop(seq, None)

    def passed(self, seq: int) -> bool:
        return seq <= self._done or seq in self._finished

    def finish(self, seq: int) -> None:
        if self.passed(seq):
            return
        self._finished.add(seq)
        while self._done + 1 in self._finished:
            self._done += 1
            self._finished.discard(self._done)
        waiter = self._waiters.get(self._done + 1)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _invalid(exc: pydantic.ValidationError, prefix: str) -> InvalidRequestError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = ".".join(str(p) for p in first.get("loc", ()))
    field = f"{prefix}.{loc}" if loc else prefix
    return InvalidRequestError(f"{field}: {first.get('msg', exc)}", field=field)


def _wire_data(data: Sequence[Any]) -> tuple[list[Datum], list[dict[str, Any]]]:
    datums: list[Datum] = []
    for i, d in enumerate(data):
        try:
            datums.append(coerce_datum(d))
        except pydantic.ValidationError as exc:
            raise _invalid(exc, f"data[{i}]") from None
    return datums, [d.to_wire(compact=True) for d in datums]


class TrainingClient:
    """One model on a trainer worker. Thread-safe; results come back as `APIFuture`s."""

    def __init__(self, base_url: str, model_id: str, api_key: str | None = None, *,
                 timeout: float = 60.0, poll_seconds: float = 25.0, session_id: str | None = None,
                 tokenizer_model: str | None = None, http: HttpClient | None = None) -> None:
        self.base_url = base_url
        self.model_id = model_id
        self.http = http or HttpClient(base_url, api_key, timeout=timeout)
        self.poll_seconds = poll_seconds
        # Per-client id: suffixes snapshot names and keys this client's seq_id sequence on the server.
        self.session_id = session_id or new_client_suffix()
        self.tokenizer_model = tokenizer_model
        self._seq_lock = threading.Lock()
        self._next_seq = 1
        self._gate = _TurnGate(first=1)
        self._releases: set[asyncio.Task[Any]] = set()
        self._info: TrainerInfo | None = None
        self._warned_restore = False
        self._tokenizer: Any = None
        self._closed = False
        add_shutdown_hook(self.http.close)

    # ------------------------------------------------------------------ construction

    @classmethod
    async def create_async(cls, base_url: str, base_model: str | None = None, *, lora_rank: int = 0,
                           lora_config: LoraConfig | Mapping[str, Any] | None = None,
                           model_id: str | None = None, seed: int | None = None,
                           forward_only: bool = False, api_key: str | None = None,
                           **kwargs: Any) -> TrainingClient:
        """Create a model on the trainer (`create_model`) and return a client for it.

        `forward_only=True` makes a reference model: forward passes only, no optimizer.
        """
        body = {"base_model": base_model, "model_id": model_id, "seed": seed, "forward_only": forward_only}
        return await run_coroutine(cls._create(base_url, body, lora_rank, lora_config, api_key, kwargs))

    @classmethod
    def create(cls, base_url: str, base_model: str | None = None, **kwargs: Any) -> TrainingClient:
        """Blocking form of `create_async`."""
        return run_sync(cls.create_async(base_url, base_model, **kwargs))

    @classmethod
    async def _create(cls, base_url: str, body: dict[str, Any], lora_rank: int,
                      lora_config: LoraConfig | Mapping[str, Any] | None, api_key: str | None,
                      kwargs: dict[str, Any]) -> TrainingClient:
        if lora_config is None and lora_rank > 0:
            lora_config = LoraConfig(rank=lora_rank)
        if lora_config is not None:
            body["lora_config"] = LoraConfig.model_validate(lora_config).model_dump(exclude_none=True)
        tokenizer_model = kwargs.pop("tokenizer_model", None) or body["base_model"]
        client = cls(base_url, "", api_key, tokenizer_model=tokenizer_model, **kwargs)
        accepted = await client.http.request_json("POST", f"{API}/create_model", json=body)
        client.model_id = accepted["model_id"]
        client._info = TrainerInfo.model_validate(await client._result(accepted["request_id"]))
        return client

    # ------------------------------------------------------------------ plumbing

    def _reserve(self, n: int = 1) -> int:
        with self._seq_lock:
            if self._closed:
                raise RuntimeError("TrainingClient is closed")
            seq = self._next_seq
            self._next_seq += n
            return seq

    async def _submit(self, endpoint: str, body: dict[str, Any], seq: int) -> str:
        """POST in seq order; returns the request id. A seq that never reaches the server is released."""
        reached = False
        try:
            await self._gate.wait(seq)
            accepted = await self.http.request_json(
                "POST", f"{API}/{endpoint}",
                json={**body, "model_id": self.model_id, "seq_id": seq, "session_id": self.session_id})
            reached = True
            return str(accepted["request_id"])
        except FiretitanError as exc:
            # A 4xx means the server saw the request and consumed its seq_id when rejecting it.
            reached = reached or 400 <= exc.status_code < 500
            raise
        finally:
            if not reached:
                self._release(seq)
            self._gate.finish(seq)

    def _release(self, seq: int) -> None:
        """Tell the server `seq` will never come, so later submissions are not held back (best effort)."""

        async def send() -> None:
            with contextlib.suppress(Exception):
                await self.http.request_json("POST", f"{API}/release_seq", retry=False, timeout=10.0, json={
                    "model_id": self.model_id, "seq_id": seq, "session_id": self.session_id})

        task = asyncio.get_running_loop().create_task(send())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _result(self, request_id: str) -> dict[str, Any]:
        """Long-poll `retrieve_future` until the result (or its typed error) arrives."""
        while True:
            body = await self.http.request_json(
                "POST", f"{API}/retrieve_future", json={"request_id": request_id, "timeout": self.poll_seconds},
                timeout=self.poll_seconds + 30.0)
            if isinstance(body, dict) and body.get("type") == "try_again":
                continue
            return body

    async def _call(self, endpoint: str, body: dict[str, Any], seq: int) -> dict[str, Any]:
        try:
            return await self._result(await self._submit(endpoint, body, seq))
        except ConflictError as exc:
            crashed = worker_crashed(exc)
            if crashed is None:
                raise
            raise crashed from exc

    def _op(self, endpoint: str, body: dict[str, Any], parse: Callable[[dict[str, Any]], Any]) -> APIFuture[Any]:
        seq = self._reserve()

        async def run() -> Any:
            return parse(await self._call(endpoint, body, seq))

        return self._guard(run_coroutine(run()), seq)

    def _guard(self, fut: APIFuture[Any], *seqs: int) -> APIFuture[Any]:
        """If `fut` is cancelled before its coroutine ran, its seq_ids must still be given up."""
        loop = get_background_loop()

        def on_done(f: APIFuture[Any]) -> None:
            if f.cancelled():
                loop.call_soon_threadsafe(self._abandon, seqs)

        fut.add_done_callback(on_done)
        return fut

    def _abandon(self, seqs: tuple[int, ...]) -> None:
        for seq in seqs:
            if not self._gate.passed(seq):
                self._release(seq)
                self._gate.finish(seq)

    # ------------------------------------------------------------------ forward / backward

    def forward(self, data: Sequence[Any], loss_fn: str = "cross_entropy",
                loss_fn_config: Mapping[str, float | str] | None = None, *,
                disable_adapter: bool = False) -> APIFuture[ForwardBackwardOutput]:
        """Per-datum target-token logprobs (untempered) and the loss metrics; no gradients.

        `disable_adapter=True` runs a LoRA model with its adapters off (a reference policy).
        """
        try:
            _, wire = _wire_data(data)
        except InvalidRequestError as exc:
            return failed(exc)
        body = {"forward_input": {"data": wire, "loss_fn": loss_fn, "loss_fn_config": _config(loss_fn_config)},
                "disable_adapter": disable_adapter}
        return self._op("forward", body, ForwardBackwardOutput.model_validate)

    async def forward_async(self, data: Sequence[Any], loss_fn: str = "cross_entropy",
                            loss_fn_config: Mapping[str, float | str] | None = None, *,
                            disable_adapter: bool = False) -> ForwardBackwardOutput:
        return await self.forward(data, loss_fn, loss_fn_config, disable_adapter=disable_adapter)

    def forward_backward(self, data: Sequence[Any], loss_fn: str,
                         loss_fn_config: Mapping[str, float | str] | None = None) -> APIFuture[ForwardBackwardOutput]:
        """Forward, built-in loss, backward; gradients accumulate on the trainer until `optim_step`."""
        try:
            _, wire = _wire_data(data)
        except InvalidRequestError as exc:
            return failed(exc)
        body = {"forward_backward_input": {"data": wire, "loss_fn": loss_fn,
                                           "loss_fn_config": _config(loss_fn_config)}}
        return self._op("forward_backward", body, ForwardBackwardOutput.model_validate)

    async def forward_backward_async(self, data: Sequence[Any], loss_fn: str,
                                     loss_fn_config: Mapping[str, float | str] | None = None) -> ForwardBackwardOutput:
        return await self.forward_backward(data, loss_fn, loss_fn_config)

    def forward_backward_custom(self, data: Sequence[Any], loss_fn: CustomLossFn, *,
                                loss_type_input: str = "logprobs", output: str = "logprobs",
                                pooling: str = "mean",
                                precomputed_forward: ForwardBackwardOutput | None = None
                                ) -> APIFuture[ForwardBackwardOutput]:
        """Any differentiable loss of the per-token logprobs, computed here with torch autograd.

        A forward pass fetches the logprobs; `loss_fn(data, logprobs)` runs locally on leaf tensors
        with `requires_grad`; then one `cross_entropy` forward_backward with
        `weights = -dLoss/dlogprob` puts exactly that gradient on the model (CE is `sum(-lp * w)`).
        `metrics["loss:sum"]` is the custom loss, `surrogate_loss:sum` the CE value; the user's
        metrics are merged in. Two seq_ids are reserved now, so later calls stay ordered after it.
        The hosted SDK's `output` / `pooling` (embedding heads) and `precomputed_forward` are not
        served: only their defaults are accepted.
        """
        unsupported = unsupported_options(loss_type_input, output, precomputed_forward)
        if unsupported is not None:
            return failed(unsupported)
        try:
            datums, _ = _wire_data(data)
            fwd_wire = [ce_datum(d, None, i).to_wire(compact=True) for i, d in enumerate(datums)]
        except InvalidRequestError as exc:
            return failed(exc)
        seq = self._reserve(2)
        return self._guard(run_coroutine(self._custom(seq, datums, fwd_wire, loss_fn)), seq, seq + 1)

    async def forward_backward_custom_async(self, data: Sequence[Any], loss_fn: CustomLossFn, *,
                                            loss_type_input: str = "logprobs",
                                            output: str = "logprobs", pooling: str = "mean",
                                            precomputed_forward: ForwardBackwardOutput | None = None
                                            ) -> ForwardBackwardOutput:
        return await self.forward_backward_custom(data, loss_fn, loss_type_input=loss_type_input, output=output,
                                                  pooling=pooling, precomputed_forward=precomputed_forward)

    async def _custom(self, seq: int, datums: list[Datum], fwd_wire: list[dict[str, Any]],
                      loss_fn: CustomLossFn) -> ForwardBackwardOutput:
        second_started = False
        try:
            fwd = ForwardBackwardOutput.model_validate(
                await self._call("forward", {"forward_input": {"data": fwd_wire, "loss_fn": "cross_entropy"}}, seq))
            value, user_metrics, grads = await asyncio.to_thread(linearize, loss_fn, datums, fwd)
            bwd_wire = [ce_datum(d, -g, i).to_wire(compact=True) for i, (d, g) in enumerate(zip(datums, grads, strict=True))]
            second_started = True
            out = ForwardBackwardOutput.model_validate(await self._call(
                "forward_backward", {"forward_backward_input": {"data": bwd_wire, "loss_fn": "cross_entropy"}},
                seq + 1))
        finally:
            if not second_started and not self._gate.passed(seq + 1):
                self._release(seq + 1)
                self._gate.finish(seq + 1)
        metrics = dict(out.metrics)
        metrics["surrogate_loss:sum"] = metrics.pop("loss:sum", 0.0)
        metrics["loss:sum"] = value
        metrics.update(user_metrics)
        return ForwardBackwardOutput(loss_fn_output_type=out.loss_fn_output_type,
                                     loss_fn_outputs=out.loss_fn_outputs, metrics=metrics)

    # ------------------------------------------------------------------ optimizer

    def optim_step(self, adam_params: Any = None, grad_accumulation_normalization: str | None = None,
                   emit_grad_norm_metrics: bool | str | None = None) -> APIFuture[OptimStepResponse]:
        """One AdamW step with exactly these hyperparameters (they may change every step).

        `grad_clip_norm > 0` clips the global gradient norm first; `metrics["grad_norm"]` is the
        norm before clipping (always reported, whatever `emit_grad_norm_metrics` says). Accepts our
        `AdamParams`, `tinker.AdamParams` or a dict. Gradients are normalised as the loss functions
        define them: `grad_accumulation_normalization` accepts None only.
        """
        if grad_accumulation_normalization is not None:
            return failed(InvalidRequestError(
                f"grad_accumulation_normalization {grad_accumulation_normalization!r} is not supported; firetitan "
                "normalises as each loss function defines (pass None)", field="grad_accumulation_normalization"))
        try:
            params = coerce_adam_params(adam_params)
        except pydantic.ValidationError as exc:
            return failed(_invalid(exc, "adam_params"))
        body = {"adam_params": params.model_dump(mode="json", exclude_none=True)}
        return self._op("optim_step", body, OptimStepResponse.model_validate)

    async def optim_step_async(self, adam_params: Any = None, grad_accumulation_normalization: str | None = None,
                               emit_grad_norm_metrics: bool | str | None = None) -> OptimStepResponse:
        return await self.optim_step(adam_params, grad_accumulation_normalization, emit_grad_norm_metrics)

    # ------------------------------------------------------------------ checkpoints

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None, *, checkpoint_type: str | None = None,
                                 export_precision: str | None = None, metadata: Any = None
                                 ) -> APIFuture[SamplerSnapshot]:
        """A sampler snapshot named `<name>-<session_id>`; `.path` is its public identity.

        Full-parameter: a `base` first, then `delta`s against it; LoRA: a PEFT adapter.
        `checkpoint_type` ("base" | "delta") overrides the automatic choice. `ttl_seconds`,
        `export_precision` and `metadata` are the hosted SDK's and ignored here (snapshots are kept
        by the store's retention; weights keep the trainer's dtype).
        """
        body = {"path": name, "client_suffix": self.session_id, "checkpoint_type": checkpoint_type}
        return self._op("save_weights_for_sampler", body, SamplerSnapshot.model_validate)

    async def save_weights_for_sampler_async(self, name: str, ttl_seconds: int | None = None, *,
                                             checkpoint_type: str | None = None, export_precision: str | None = None,
                                             metadata: Any = None) -> SamplerSnapshot:
        return await self.save_weights_for_sampler(name, ttl_seconds, checkpoint_type=checkpoint_type,
                                                   export_precision=export_precision, metadata=metadata)

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False, *,
                   timeout: float | None = None) -> APIFuture[SaveWeightsResponse]:
        """Weights and optimizer state (DCP) for exact resume; `.path` loads with `load_state*`.

        `ttl_seconds` and `timeout` are the hosted SDK's and ignored here (await the future with
        your own timeout)."""
        return self._op("save_weights", {"path": name, "overwrite": overwrite}, SaveWeightsResponse.model_validate)

    async def save_state_async(self, name: str, ttl_seconds: int | None = None,
                               overwrite: bool = False) -> SaveWeightsResponse:
        return await self.save_state(name, ttl_seconds, overwrite)

    def load_state(self, path: str, weights_access_token: str | None = None) -> APIFuture[LoadWeightsResponse]:
        """Load weights from a train state; the optimizer starts fresh."""
        return self._op("load_weights", {"path": path, "optimizer": False}, LoadWeightsResponse.model_validate)

    async def load_state_async(self, path: str, weights_access_token: str | None = None) -> LoadWeightsResponse:
        return await self.load_state(path)

    def load_state_with_optimizer(self, path: str, weights_access_token: str | None = None
                                  ) -> APIFuture[LoadWeightsResponse]:
        """Load weights and optimizer state: training continues exactly as if never interrupted."""
        return self._op("load_weights", {"path": path, "optimizer": True}, LoadWeightsResponse.model_validate)

    async def load_state_with_optimizer_async(self, path: str, weights_access_token: str | None = None
                                              ) -> LoadWeightsResponse:
        return await self.load_state_with_optimizer(path)

    # ------------------------------------------------------------------ info

    def get_info(self) -> APIFuture[TrainerInfo]:
        """Model name, LoRA rank, parameter counts, step and policy version (fresh from the trainer)."""

        async def run() -> TrainerInfo:
            body = await self.http.request_json("POST", f"{API}/get_info", json={"model_id": self.model_id})
            self._info = TrainerInfo.model_validate(body)
            if self._info.restored_from_step is not None and not self._warned_restore:
                self._warned_restore = True
                log.warning("trainer_restarted_state_restored", model_id=self.model_id,
                            restored_from_step=self._info.restored_from_step, steps_lost=self._info.steps_lost)
                warnings.warn(f"trainer model {self.model_id!r} was restarted: it resumed from its saved state of "
                              f"step {self._info.restored_from_step}; {self._info.steps_lost} step(s) after it "
                              "were lost", RuntimeWarning, stacklevel=2)
            return self._info

        return run_coroutine(run())

    async def get_info_async(self) -> TrainerInfo:
        return await self.get_info()

    def get_tokenizer(self) -> Any:
        """The model's tokenizer (`firetitan.models.load_tokenizer`), cached."""
        if self._tokenizer is None:
            from firetitan.models import load_tokenizer

            name = self.tokenizer_model
            if name is None:
                info = self._info or self.get_info().result()
                name = info.model_name
            self._tokenizer = load_tokenizer(name)
        return self._tokenizer

    def unload_model(self) -> APIFuture[dict[str, Any]]:
        """Drop the model from the trainer (frees its memory)."""
        return run_coroutine(self.http.request_json("POST", f"{API}/unload_model", json={"model_id": self.model_id}))

    # ------------------------------------------------------------------ lifecycle

    def list_checkpoints(self) -> APIFuture[list[str]]:
        """Names of the train states (`save_state`) in the trainer's state directory, oldest first."""

        async def run() -> list[str]:
            body = await self.http.request_json("POST", f"{API}/list_checkpoints", json={"model_id": self.model_id})
            return list(body["checkpoints"])

        return run_coroutine(run())

    async def _shutdown(self) -> None:
        if self._releases:  # let in-flight seq releases reach the server (each is bounded by 10 s)
            await asyncio.wait(list(self._releases), timeout=10.0)
        await self.http.close()

    async def close_async(self) -> None:
        """Close the HTTP session (the model stays on the trainer). Idempotent."""
        self._closed = True
        await run_coroutine(self._shutdown())

    def close(self) -> None:
        self._closed = True
        run_sync(self._shutdown(), timeout=15)

    def __repr__(self) -> str:
        return f"TrainingClient(base_url={self.base_url!r}, model_id={self.model_id!r})"


def _config(config: Mapping[str, float | str] | None) -> dict[str, float | str] | None:
    return None if config is None else dict(config)


def worker_crashed(exc: ConflictError) -> WorkerCrashedError | None:
    """The control plane's gateway answers 409 on `rlorTrainerJobId` when the job is no longer
    running: the trainer died (mid-call or before it). Callers must tell that from a state conflict
    (a snapshot chain, a name taken), so it becomes `WorkerCrashedError`."""
    if exc.field == "rlorTrainerJobId" and type(exc) is ConflictError:
        return WorkerCrashedError(exc.message, field=exc.field, status_code=exc.status_code, body=exc.body)
    return None
