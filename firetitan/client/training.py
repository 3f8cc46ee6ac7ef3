"""`TrainingClient`: drives one model on a trainer worker over HTTP (Tinker-style, futures, seq ordering).

Every operation gets the next `seq_id` when it is *called*, is submitted in that order (a turn gate),
executes on the trainer in that order, and returns an `APIFuture` at once. So
`fb = tc.forward_backward(...); opt = tc.optim_step(...)` followed by `fb.result(); opt.result()`
gives exactly what awaiting each call in turn gives. `foo_async(...)` is a coroutine that returns
the result of `foo(...)`. The ordering is `seq_calls.py`, the wire types `training_wire.py`, the
custom-loss passes `custom_loss.py`.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pydantic

from firetitan.checkpoints.identity import new_client_suffix
from firetitan.client.custom_loss import CustomLossFn, ce_datum, run_custom, unsupported_options
from firetitan.client.http import HttpClient
from firetitan.client.seq_calls import API, SeqOrderedCalls
from firetitan.client.training_wire import (
    SamplerSnapshot,
    TrainerInfo,
    invalid,
    loss_config,
    wire_data,
    worker_crashed,
)
from firetitan.errors import InvalidRequestError
from firetitan.futures import (
    APIFuture,
    add_shutdown_hook,
    failed,
    run_coroutine,
    run_sync,
)
from firetitan.logging import get_logger
from firetitan.types import (
    ForwardBackwardOutput,
    LoadWeightsResponse,
    LoraConfig,
    OptimStepResponse,
    SaveWeightsResponse,
    coerce_adam_params,
)

log = get_logger("firetitan.client.training")

# The names this module held before the split keep importing from here.
__all__ = ["API", "SamplerSnapshot", "TrainerInfo", "TrainingClient", "worker_crashed"]

class TrainingClient(SeqOrderedCalls):
    """One model on a trainer worker. Thread-safe; results come back as `APIFuture`s."""

    def __init__(self, base_url: str, model_id: str, api_key: str | None = None, *,
                 timeout: float = 60.0, poll_seconds: float = 25.0, session_id: str | None = None,
                 tokenizer_model: str | None = None, http: HttpClient | None = None) -> None:
        super().__init__(http or HttpClient(base_url, api_key, timeout=timeout), model_id,
                         session_id or new_client_suffix(), poll_seconds)
        self.base_url = base_url
        self.tokenizer_model = tokenizer_model
        self._info: TrainerInfo | None = None
        self._warned_restore = False
        self._tokenizer: Any = None
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

    # ------------------------------------------------------------------ forward / backward

    def forward(self, data: Sequence[Any], loss_fn: str = "cross_entropy",
                loss_fn_config: Mapping[str, float | str] | None = None, *,
                disable_adapter: bool = False) -> APIFuture[ForwardBackwardOutput]:
        """Per-datum target-token logprobs (untempered) and the loss metrics; no gradients.

        `disable_adapter=True` runs a LoRA model with its adapters off (a reference policy).
        """
        try:
            _, wire = wire_data(data)
        except InvalidRequestError as exc:
            return failed(exc)
        body = {"forward_input": {"data": wire, "loss_fn": loss_fn, "loss_fn_config": loss_config(loss_fn_config)},
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
            _, wire = wire_data(data)
        except InvalidRequestError as exc:
            return failed(exc)
        body = {"forward_backward_input": {"data": wire, "loss_fn": loss_fn,
                                           "loss_fn_config": loss_config(loss_fn_config)}}
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
            datums, _ = wire_data(data)
            fwd_wire = [ce_datum(d, None, i).to_wire(compact=True) for i, d in enumerate(datums)]
        except InvalidRequestError as exc:
            return failed(exc)
        seq = self._reserve(2)
        return self._guard(run_coroutine(run_custom(self._call, self._abandon, seq, datums, fwd_wire, loss_fn)),
                           seq, seq + 1)

    async def forward_backward_custom_async(self, data: Sequence[Any], loss_fn: CustomLossFn, *,
                                            loss_type_input: str = "logprobs",
                                            output: str = "logprobs", pooling: str = "mean",
                                            precomputed_forward: ForwardBackwardOutput | None = None
                                            ) -> ForwardBackwardOutput:
        return await self.forward_backward_custom(data, loss_fn, loss_type_input=loss_type_input, output=output,
                                                  pooling=pooling, precomputed_forward=precomputed_forward)

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
            return failed(invalid(exc, "adam_params"))
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
