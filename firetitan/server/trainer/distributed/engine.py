"""A TrainerEngine sharded with FSDP2 over a process group: rank 0 serves and broadcasts each operation.

Every public operation on rank 0 first sends `(op, kwargs)` on the command channel; every rank then
runs the same `_op_<name>` in the same order, so their collectives always pair up. Decisions that
must agree (a refused step) are all-reduced before anyone raises.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from firetitan.checkpoints.train_state import (
    TrainStateInfo,
    save_train_state,
)
from firetitan.errors import FiretitanError, InvalidRequestError, NonFiniteError
from firetitan.logging import get_logger
from firetitan.losses import compute_loss
from firetitan.server.trainer.batch import PreparedBatch, gather_logprobs
from firetitan.server.trainer.distributed.group import RankGroup, rank_died, start_group
from firetitan.server.trainer.distributed.split import merge_metrics, split_batch
from firetitan.server.trainer.engine import ModelSpec, TrainerEngine, _fb_body, grad_square_sum, local_shard
from firetitan.types import AdamParams

log = get_logger("firetitan.server.trainer.distributed")


class DistributedEngine(TrainerEngine):
    """One rank's shard of the job model; `group.rank == 0` is the one the HTTP service drives."""

    def __init__(self, model_id: str, spec: ModelSpec, *, store: Any, states: Any, group: RankGroup) -> None:
        if spec.is_lora:
            raise InvalidRequestError("world_size: a data-parallel trainer (world_size > 1) trains full "
                                      "parameters only; use lora_rank 0 or world_size 1", field="world_size")
        self.group = group
        if group.device.type == "cuda":  # the job names the first GPU; each rank builds on its own
            spec = dataclasses.replace(spec, device=str(group.device))
        self._lock = threading.Lock()  # one operation at a time crosses the command channel
        super().__init__(model_id, spec, store=store, states=states)
        self._shard()

    def _shard(self) -> None:
        # Same weights everywhere before sharding, whatever each rank's initialisation drew.
        with torch.no_grad():
            for tensor in self.model.state_dict().values():
                dist.broadcast(tensor, src=0)
        mesh = init_device_mesh(self.group.device.type, (self.group.world_size,))
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        for layer in layers or []:
            fully_shard(layer, mesh=mesh)  # one all-gather per decoder layer, freed after use
        fully_shard(self.model, mesh=mesh)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = None if self.spec.forward_only else self._new_optimizer()
        log.info("model_sharded", rank=self.group.rank, world_size=self.group.world_size,
                 layers=len(layers or []), local_elements=sum(local_shard(p).numel() for p in self.params))

    # -- driving (rank 0) and serving (other ranks)
    def _drive(self, op: str, **kwargs: Any) -> Any:
        with self._lock:
            try:
                self.group.send((op, kwargs))
                return getattr(self, f"_op_{op}")(**kwargs)
            except FiretitanError:
                raise
            except Exception as exc:
                # A collective that fails because a peer died says "connection closed": name the rank.
                dead = self.group.dead_rank(wait_s=2.0)
                if dead is None:
                    raise
                raise rank_died(dead) from exc

    def serve(self) -> None:
        """Ranks 1..N-1: run rank 0's operations until it is gone (the parent watchdog exits us)."""
        while True:
            op, kwargs = self.group.receive()
            try:
                getattr(self, f"_op_{op}")(**kwargs)
            except FiretitanError as exc:  # decided by all ranks together: rank 0 reports it
                log.debug("op_refused", op=op, rank=self.group.rank, error=str(exc))

    def _any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (every rank must call this at the same point)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.group.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    # -- forward / backward
    def forward(self, batch: PreparedBatch, *, backward: bool, disable_adapter: bool = False) -> dict[str, Any]:
        if disable_adapter:
            raise InvalidRequestError("disable_adapter: the model is full-parameter; it has no adapter",
                                      field="disable_adapter")
        return self._drive("forward", batch=batch, backward=backward)

    def _op_forward(self, batch: PreparedBatch, backward: bool) -> dict[str, Any] | None:
        rank, world = self.group.rank, self.group.world_size
        part = split_batch(batch, rank, world)
        grad_mode = torch.enable_grad() if backward else torch.no_grad()
        with grad_mode:
            if part is None:
                # No datums for this rank: a one-token pass still joins every FSDP collective.
                ids = torch.full((1, 1), self.pad_id, dtype=torch.int64, device=self.group.device)
                loss = self.model(input_ids=ids, use_cache=False).logits.sum() * 0.0
                lps: list[torch.Tensor] = []
                metrics: dict[str, float] = {}
            else:
                out = self.model(input_ids=part.input_ids, attention_mask=part.attention_mask, use_cache=False)
                lps = gather_logprobs(out.logits, part)
                flat_lp = torch.cat([lp.reshape(-1) for lp in lps])
                flat_inputs = {"target_tokens": torch.cat([t.reshape(-1) for t in part.targets])}
                for key in part.inputs[0]:
                    flat_inputs[key] = torch.cat([inp[key].reshape(-1) for inp in part.inputs])
                loss, metrics = compute_loss(part.loss_fn, flat_lp, flat_inputs, part.loss_fn_config)
            total = torch.tensor([float(loss.detach())], dtype=torch.float64, device=self.group.device)
            dist.all_reduce(total)
            loss_sum = float(total.item())
            if backward:
                if not math.isfinite(loss_sum):
                    raise NonFiniteError(
                        f"loss: {batch.loss_fn} gave a non-finite loss ({loss_sum}); the step was refused and "
                        "the accumulated gradients are unchanged (check advantages and logprobs)", field="loss")
                self._backward_all(loss)
                self.pending_backward += 1
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        mine = ([lp.detach().cpu() for lp in lps], metrics, 0 if part is None else part.num_tokens)
        dist.gather_object(mine, gathered, dst=0)
        if rank != 0:
            return None
        assert gathered is not None
        all_lps = [lp for part_lps, _, _ in gathered for lp in part_lps]
        merged = merge_metrics([(m, n) for _, m, n in gathered])
        merged["loss:sum"] = loss_sum
        if not math.isfinite(loss_sum):
            log.warning("non_finite_loss", model_id=self.model_id, loss_fn=batch.loss_fn)
        return _fb_body(all_lps, merged)

    def _backward_all(self, loss: torch.Tensor) -> None:
        """Backward into fresh gradients, kept only if every rank's are finite.

        FSDP averages the reduce-scattered gradients over ranks; our losses are sums over tokens, so
        each rank's loss is scaled by the world size first and the result is the sum (exact for
        powers of two; gloo has no pre-multiplied sum to set a divide factor of 1).
        """
        held = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        (loss * self.group.world_size).backward()
        bad = any(p.grad is not None and not bool(torch.isfinite(local_shard(p.grad)).all()) for p in self.params)
        if self._any(bad):
            for p, g in zip(self.params, held, strict=True):
                p.grad = g
            raise NonFiniteError("loss: the backward pass gave non-finite gradients; the step was refused and "
                                 "the accumulated gradients are unchanged", field="loss")
        for p, g in zip(self.params, held, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else g.add_(p.grad)

    # -- optimizer
    def optim_step(self, params: AdamParams) -> dict[str, Any]:
        return self._drive("optim_step", params=params)

    def _op_optim_step(self, params: AdamParams) -> dict[str, Any]:
        return TrainerEngine.optim_step(self, params)  # every rank runs the same step on its shards

    def _grad_norm(self, grads: list[torch.Tensor]) -> float:
        square = torch.tensor([grad_square_sum(grads)], dtype=torch.float64, device=self.group.device)
        dist.all_reduce(square)  # every rank takes part, even one without gradients
        return math.sqrt(float(square.item())) if grads else 0.0

    def _clip_grads(self, grads: list[torch.Tensor], clip: float, max_norm: float, grad_norm: float) -> None:
        if clip < 1.0:
            with torch.no_grad():
                for g in grads:
                    local_shard(g).mul_(clip)

    def _check_update(self, params: AdamParams, clip: float) -> None:
        refused: NonFiniteError | None = None
        try:
            super()._check_update(params, clip)  # on this rank's shards
        except NonFiniteError as exc:
            refused = exc
        if self._any(refused is not None):
            raise refused or NonFiniteError(
                f"adam_params: this update (learning_rate={params.learning_rate:g}, eps={params.eps:g}) would "
                "make weights or optimizer state non-finite on another rank; the step was refused and nothing "
                "changed", field="adam_params")

    # -- sampler snapshots: gathered to full weights on rank 0
    def _full_state(self) -> dict[str, torch.Tensor]:
        return self._drive("full_state")

    def _op_full_state(self) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)  # empty on ranks 1..N-1

    # -- train state: DCP, every rank writes its shards
    def state_writer(self, path: Path, model: torch.nn.Module, optimizer: Any, step: int,  # type: ignore[override]
                     extra: dict[str, Any] | None = None, *, name: str | None = None) -> TrainStateInfo:
        path = Path(path)
        if path.exists():  # checked before any rank starts writing
            save_train_state(path, model, optimizer, step, extra, name=name)  # raises the ConflictError
        tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{os.urandom(4).hex()}"
        return self._drive("save_state", path=str(path), tmp=str(tmp), step=step, extra=extra, name=name)

    def _op_save_state(self, path: str, tmp: str, step: int, extra: dict[str, Any] | None,
                       name: str | None) -> TrainStateInfo:
        return save_train_state(path, self.model, self.optimizer, step, extra, name=name, tmp=tmp,
                                coordinator=self.group.rank == 0)

    def load_state(self, path: str, with_optimizer: bool) -> dict[str, Any]:
        assert self.states is not None
        if with_optimizer and not self.states.info(path).has_optimizer:
            # Refused on rank 0 before any rank starts loading, so no collective is left half done.
            raise InvalidRequestError(f"train state {path!r} was saved without optimizer state; load it without "
                                      "the optimizer", field="path")
        return super().load_state(path, with_optimizer)

    def _load_files(self, path: Path, with_optimizer: bool, root: Path | None) -> tuple[int, dict[str, Any]]:
        return self._drive("load", path=str(path), with_optimizer=with_optimizer,
                           root=None if root is None else str(root))

    def _op_load(self, path: str, with_optimizer: bool, root: str | None) -> tuple[int, dict[str, Any]]:
        """DCP reshards: a state saved by any number of ranks loads into this many."""
        return TrainerEngine._load_files(self, Path(path), with_optimizer, None if root is None else Path(root))

def engine_factory(world_size: int, device: torch.device, rank_args: list[str]) -> Callable[..., TrainerEngine]:
    """`TrainerSettings.make_engine` for a job of `world_size` ranks: starts the group, shards the
    model, and fails the worker's pending futures (then exits) when a rank dies."""
    def make(model_id: str, spec: ModelSpec, *, store: Any, states: Any, futures: Any) -> TrainerEngine:
        try:  # built in a worker thread of the service's event loop
            loop = anyio.from_thread.run_sync(asyncio.get_running_loop)
        except RuntimeError:
            loop = None

        def on_failure(error: FiretitanError) -> None:
            if loop is not None:
                loop.call_soon_threadsafe(futures.fail_pending, error.status_code, error.to_body())

        group = start_group(world_size, device, [*rank_args, "--model-id", model_id, "--spec", _spec_json(spec)],
                            on_failure)
        try:
            return DistributedEngine(model_id, spec, store=store, states=states, group=group)
        except BaseException:
            group.kill_children()
            raise

    return make


def _spec_json(spec: ModelSpec) -> str:
    return json.dumps({"base_model": spec.base_model, "forward_only": spec.forward_only, "seed": spec.seed,
                       "device": spec.device, "dtype": spec.dtype})
