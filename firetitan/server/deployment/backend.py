"""The seam between the deployment routes and an engine: the Protocol a backend implements, and the built-in one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from firetitan.server.deployment.engine import (
    DecodeOptions,
    Engine,
    EngineRequest,
    EngineStats,
    StepOutput,
    WeightSwap,
)
from firetitan.server.deployment.engine.runner import kv_row_positions

if TYPE_CHECKING:
    from firetitan.checkpoints import SnapshotStore
    from firetitan.server.deployment.hotload import SnapshotLoader

Emit = Callable[[list[tuple[EngineRequest, StepOutput]]], None]


class EngineBackend(Protocol):
    """What the routes need from an engine (the embedded one, the simulation's queue model, a vLLM client).

    `submit`, `abort` and `swap_weights` may be called from the event loop and must not block; the backend
    reports every request's progress through the `emit` callback it was built with (any thread), one
    `StepOutput` per request per step, the last with a `finish_reason`.
    """

    stats: EngineStats

    @property
    def policy_version(self) -> str: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...
    @property
    def reserved_tokens(self) -> int: ...
    @property
    def max_cached_tokens(self) -> int: ...

    def start(self) -> None: ...
    def stop(self, timeout: float = 10.0) -> None: ...
    def submit(self, request: EngineRequest) -> None: ...
    def abort(self, request_id: str) -> None: ...
    def swap_weights(self, swap: WeightSwap) -> None: ...


class TextCodec(Protocol):
    """The part of a tokenizer the routes use (text prompts in, token text out)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int], **kw: Any) -> str: ...


@dataclass
class Serving:
    """One deployment's serving parts: how to build its engine, its tokenizer and limits, its weights."""

    make_engine: Callable[[Emit], EngineBackend]
    tokenizer: TextCodec
    vocab_size: int
    max_positions: int
    model: torch.nn.Module | None = None  # None when no weights live in this process (simulation)
    startup_weights: Mapping[str, torch.Tensor] | None = None  # what LoRA adapters merge into
    marks: dict[str, Any] = field(default_factory=dict)  # extra fields on /health and answers
    # Backends whose weights live elsewhere (vLLM) bring their own snapshot loader, a liveness probe
    # (None: healthy; else the fields of a 503 /health body) and metrics appended to firetitan's own.
    make_loader: Callable[[SnapshotStore], SnapshotLoader] | None = None
    probe: Callable[[], Awaitable[dict[str, Any] | None]] | None = None
    extra_metrics: Callable[[], Awaitable[str]] | None = None


class StartupWeights(Mapping[str, torch.Tensor]):
    """The base model's weights as it started, rebuilt from the model only when read (a LoRA merge).

    The served model changes under hot-loads, so LoRA merges need the original weights; a clone would
    hold a second full copy for the process's life. Here a read loads the model once and hands each
    tensor out once (`dict(weights)` reads every key once), so nothing stays resident between merges.
    """

    def __init__(self, base_model: str, names: list[str], dtype: str = "float32") -> None:
        self.base_model = base_model
        self.dtype = dtype
        self._names = names
        self._known = frozenset(names)
        self._pending: dict[str, torch.Tensor] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        from firetitan.models import load_model

        return dict(load_model(self.base_model, dtype=self.dtype).state_dict())

    def keys(self) -> list[str]:  # type: ignore[override]
        # `dict(weights)` calls keys() and then reads each key once: load once for the whole copy.
        self._pending = self._load()
        return list(self._names)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        if self._pending is not None and key in self._pending:
            value = self._pending.pop(key)
            if not self._pending:
                self._pending = None
            return value
        return self._load()[key]  # a lone read keeps nothing

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def embedded_serving(base_model: str, *, max_running_seqs: int, max_cached_tokens: int, seed: int,
                     max_prefill_tokens: int, max_kv_tokens: int | None = None, device: str = "cpu",
                     dtype: str = "float32", threads: int | None = None,
                     decode: DecodeOptions = DecodeOptions()) -> Serving:
    """The built-in torch engine over a model loaded in this process, in `dtype` on `device` (resolved);
    its thread takes `threads` torch threads (None: leaves the count as it finds it) and runs its decode
    step as `decode` allows (batch packs, native kernels: `engine.runner.DecodeOptions`)."""
    from firetitan.models import load_model, load_tokenizer

    model = load_model(base_model, dtype=dtype).to(device)
    tokenizer = load_tokenizer(base_model)
    eos = _eos_ids(tokenizer)

    def make_engine(emit: Emit) -> EngineBackend:
        return Engine(model, tokenizer, emit=emit, policy_version=base_model, max_running_seqs=max_running_seqs,
                      max_cached_tokens=max_cached_tokens, eos_token_ids=eos, seed=seed,
                      max_prefill_tokens=max_prefill_tokens, max_kv_tokens=max_kv_tokens, threads=threads,
                      decode=decode)

    cfg = model.config
    context = kv_row_positions(int(cfg.max_position_embeddings), max_running_seqs, max_kv_tokens)
    return Serving(make_engine, tokenizer, int(cfg.vocab_size), context, model=model,
                   startup_weights=StartupWeights(base_model, list(model.state_dict()), dtype))


def _eos_ids(tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for token in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
