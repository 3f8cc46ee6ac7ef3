"""Decode-step building blocks with fewer tensor ops than the transformers modules, bit-identical to them."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Self

import torch
import torch.nn.functional as F

from firetitan.server.deployment.engine.native import (
    RowBlocked,
    RowBlockedKernel,
    row_block,
    row_blocked_kernel,
)

# Rotary types whose angles depend on the position only (not on the longest sequence seen), so one table
# computed at start serves every step. Others ("dynamic", "longrope") keep calling the model's module.
_STATIC_ROPE = frozenset({"default", "linear", "llama3", "yarn"})


def rms_norm(module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm (`weight * x * rsqrt(mean(x^2) + eps)`, computed in float32) as one fused op.

    A decode step calls a norm 4 times per layer; the module form is 7 tensor ops each. The fused op
    gives the same bits in float32 (the same products in the same order); other dtypes upcast as the
    module does. Modules of another shape (no `variance_epsilon`) are simply called.
    """
    eps = getattr(module, "variance_epsilon", None)
    weight = getattr(module, "weight", None)
    if eps is None or weight is None:
        return module(hidden)
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(hidden, weight.shape, weight, eps)
    return weight * F.rms_norm(hidden.float(), weight.shape, None, eps).to(hidden.dtype)


class RopeTable:
    """cos and sign-folded sin of every position up to `max_positions`, computed once by the model's
    own rotary module (so scaling and its attention factor are the model's).

    `apply` is `x * cos + rotate_half(x) * sin` as 4 ops instead of 7: `rotate_half(x) * sin` equals
    `roll(x, D/2) * sin'` with the first half of `sin'` negated (a negation is exact, so the bits match).
    Memory: 2 * max_positions * head_dim values of the model dtype.
    """

    def __init__(self, rotary: torch.nn.Module, max_positions: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        positions = torch.arange(max_positions, device=device).unsqueeze(0)
        probe = torch.empty(1, dtype=dtype, device=device)
        with torch.no_grad():
            cos, sin = rotary(probe, positions)
        self.cos = cos[0].contiguous()  # [P, D]
        half = head_dim // 2
        self.sin = torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1).contiguous()
        self.half = half

    @staticmethod
    def supports(rotary: torch.nn.Module) -> bool:
        rope_type = getattr(rotary, "rope_type", "default")
        return isinstance(rope_type, str) and rope_type in _STATIC_ROPE

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and folded sin for `positions` [B] as [B, 1, 1, D] (broadcast over heads and one token)."""
        shape = (positions.shape[0], 1, 1, self.cos.shape[-1])
        return self.cos[positions].view(shape), self.sin[positions].view(shape)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + torch.roll(x, self.half, dims=-1) * sin


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def onednn_packing_works(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this torch build can prepack a weight for oneDNN matmuls here (CPU, float32/bfloat16)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = torch.ones(4, 8, dtype=dtype)
        out = _onednn_linear(torch.ones(2, 8, dtype=dtype), torch.ops.mkldnn._reorder_linear_weight(probe, None))
    except (RuntimeError, AttributeError):  # an op missing or refused by this build: use plain matmuls
        return False
    return bool(torch.all(out == 8))


class MklPacked(NamedTuple):
    """A weight packed by MKL for one exact row count, with a stand-in of the source's shape.

    `_mkl_linear` reads the output width from `origin` and multiplies by it when the input's rows differ
    from the pack's; the stand-in is a zero-stride view (no memory), so callers must match the rows.
    """

    packed: torch.Tensor
    origin: torch.Tensor


LaidOut = torch.Tensor | MklPacked | RowBlocked  # a projection weight as one of the matmul paths keeps it


def mkl_packing_works(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this torch build can pack a float32 weight for MKL's batch-shaped GEMM here (CPU)."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkl.is_available():
        return False
    try:
        weight = torch.arange(32, dtype=dtype).view(4, 8)
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 2)
        out = torch.ops.mkl._mkl_linear(torch.ones(2, 8, dtype=dtype), packed, weight, None, 2)
    except (RuntimeError, AttributeError):
        return False
    return bool(torch.equal(out, F.linear(torch.ones(2, 8, dtype=dtype), weight)))


class ProjectionWeights:
    """Every projection of the decoder and the lm_head, laid out for the fastest matmul available.

    Per layer q/k/v are one weight and gate/up one, so 7 matmuls become 4. On the CPU with oneDNN
    (float32 or bfloat16) each weight is also *prepacked*: reordered once into oneDNN's blocked layout,
    so no matmul repacks its weight on every call. That is what bounds a small model's step: measured
    on SmolLM2-135M (2 threads, every matmul of one step, weights cold in cache), float32 35 / 48 / 117 ms
    per step at batch 1 / 16 / 64 against 61 / 101 / 183 ms for `F.linear` (1.7x / 2.1x / 1.6x); bfloat16
    18 / 23 / 60 ms. Results differ from `F.linear` by float rounding only (another summation order).
    Elsewhere (GPU, other dtypes, a torch without the ops) they are plain fused copies under `F.linear`.

    Memory: one more copy of every projection weight and of the lm_head (for SmolLM2 float32: +538 MB).
    The copies are rebuilt whenever a source weight was replaced or written (a hot-load copies into the
    modules, which bumps each tensor's version), checked once per step.
    Only built for bias-free projections of the usual names; `None` from `build` means "use the modules".
    """

    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module], packed: bool) -> None:
        self.model = model
        self.layers = layers
        self.packed = packed
        self.qkv: list[LaidOut] = []
        self.o: list[LaidOut] = []
        self.gate_up: list[LaidOut] = []
        self.down: list[LaidOut] = []
        self.head: LaidOut | None = None
        self.sizes: list[tuple[int, int, int]] = []
        self._key: list[tuple[int, int]] = []

    @staticmethod
    def supports(model: torch.nn.Module, layers: list[torch.nn.Module]) -> bool:
        """Bias-free projections of the usual names, an MLP with `act_fn`, a bias-free Linear lm_head."""
        for layer in layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if getattr(getattr(layer.self_attn, name, None), "bias", 0) is not None:
                    return False
            for name in ("gate_proj", "up_proj", "down_proj"):
                if getattr(getattr(layer.mlp, name, None), "bias", 0) is not None:
                    return False
            if not hasattr(layer.mlp, "act_fn"):
                return False
        head = getattr(model, "lm_head", None)
        return isinstance(head, torch.nn.Linear) and head.bias is None

    @classmethod
    def build(cls, model: torch.nn.Module, layers: list[torch.nn.Module], *, allow_packing: bool = True
              ) -> ProjectionWeights | None:
        if not cls.supports(model, layers):
            return None
        weight = model.lm_head.weight
        return cls(model, layers, allow_packing and onednn_packing_works(weight.dtype, weight.device))._first_build()

    def _first_build(self) -> Self | None:
        """Build the copies now; None where the weights keep no version counter (inference tensors), so a
        hot-load's change to them could not be seen."""
        try:
            self.refresh()
        except RuntimeError:
            return None
        return self

    def _sources(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [self.model.lm_head.weight]
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            out += [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
                    mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
        return out

    def _current_key(self) -> list[tuple[int, int]]:
        return [(w.data_ptr(), w._version) for w in self._sources()]

    def _layout(self, weight: torch.Tensor) -> LaidOut:
        if self.packed:
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        return weight.detach()

    def refresh(self) -> None:
        """Rebuild the weights if any source weight was replaced or written since the last build."""
        key = self._current_key()
        if key == self._key:
            return
        # Drop the old copies first: the peak stays one copy, not two.
        self.qkv, self.o, self.gate_up, self.down, self.head = [], [], [], [], None
        with torch.no_grad():
            for layer in self.layers:
                attn, mlp = layer.self_attn, layer.mlp
                self.qkv.append(self._layout(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])))
                self.o.append(self._layout(attn.o_proj.weight))
                self.gate_up.append(self._layout(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])))
                self.down.append(self._layout(mlp.down_proj.weight))
            self.head = self._layout(self.model.lm_head.weight)
        self.sizes = [(layer.self_attn.q_proj.weight.shape[0], layer.self_attn.k_proj.weight.shape[0],
                       layer.self_attn.v_proj.weight.shape[0]) for layer in self.layers]
        self._key = key

    def linear(self, x: torch.Tensor, weight: LaidOut) -> torch.Tensor:
        assert isinstance(weight, torch.Tensor)
        return _onednn_linear(x, weight) if self.packed else F.linear(x, weight)

    def qkv_proj(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nq, nk, _nv = self.sizes[index]
        qkv = self.linear(x, self.qkv[index])
        return qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]

    def o_proj(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.o[index])

    def mlp(self, index: int, x: torch.Tensor, gate: Callable[[torch.Tensor], torch.Tensor] | None = None
            ) -> torch.Tensor:
        """The MLP of layer `index`; `gate` computes `act(gate) * up` from the fused gate/up output (the
        native glue's), else the module's `act_fn` does."""
        gate_up = self.linear(x, self.gate_up[index])
        if gate is not None:
            return self.linear(gate(gate_up), self.down[index])
        half = gate_up.shape[-1] // 2
        # In place on the activation's fresh output: one allocation less (a prefill's are 12.6 MB each).
        return self.linear(self.layers[index].mlp.act_fn(gate_up[..., :half]).mul_(gate_up[..., half:]), self.down[index])

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        assert self.head is not None
        return self.linear(x, self.head)


class BatchPackedWeights(ProjectionWeights):
    """The prepared projections packed by MKL for exactly `rows` input rows (float32 on the CPU).

    MKL's packed GEMM lays a weight out for one row count and then runs faster than oneDNN's prepacked
    layout or plain BLAS at that count: on SmolLM2-135M (2 threads, every matmul of a step, weights cold)
    37 / 48 / 71 ms at 16 / 32 / 64 rows against 40 / 55 / 90 ms for oneDNN. Other row counts would
    need another pack (zero-padding the rows up to a pack's gave nothing: 48 rows through a 64-row pack
    took as long as plain BLAS), so `batch_packs` keeps packs only for batch sizes that decode keeps
    running at. Same weights, fused the same way and rebuilt the same way after a hot-load; results
    differ from `F.linear` by float rounding only. Memory: one copy of every projection and the lm_head
    (MKL reserves ~3x that in address space; only one copy is ever touched). Packing SmolLM2 took 0.14 s.
    """

    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module], rows: int) -> None:
        super().__init__(model, layers, packed=False)
        self.rows = rows

    @classmethod
    def for_rows(cls, model: torch.nn.Module, layers: list[torch.nn.Module], rows: int) -> BatchPackedWeights:
        packs = cls(model, layers, rows)
        packs.refresh()
        return packs

    def _layout(self, weight: torch.Tensor) -> MklPacked:
        weight = weight.detach()
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, self.rows)
        return MklPacked(packed, weight.new_zeros(()).expand(weight.shape))

    def linear(self, x: torch.Tensor, weight: LaidOut) -> torch.Tensor:
        assert isinstance(weight, MklPacked)
        rows = x.numel() // x.shape[-1]
        if rows != self.rows:  # MKL would multiply by the zero stand-in: never let it
            raise ValueError(f"weights packed for {self.rows} rows were given {rows}")
        return torch.ops.mkl._mkl_linear(x, weight.packed, weight.origin, None, self.rows)


class RowBlockedWeights(ProjectionWeights):
    """The prepared projections row-blocked for the native matmul (`native`, float32 CPU).

    Each weight is stored as blocks of 16 output rows with their columns interleaved, so every block is
    one sequential stream, read once per tile of 8 input rows x 3 blocks (`kernels/row_blocked.c`).
    Measured on SmolLM2-135M (2 threads, every matmul of a step, weights cold, best of 12): 12 ms at 1-2
    rows, 25 ms at 16 and 85 ms at 64, against 26-27 / 36 / 104 ms through oneDNN's prepacked weights;
    ~200 GFLOP/s from 64 rows up, the machine's matmul limit. Any number of rows; the path choices of
    decode (per batch size) and prefill (per token rows) decide whether it is the fastest here. Same
    fused weights, rebuilt the same way after a hot-load; results differ from `F.linear` by float
    rounding only. Memory: one copy of every projection and the lm_head (SmolLM2 float32: +538 MB).
    """

    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module], kernel: RowBlockedKernel) -> None:
        super().__init__(model, layers, packed=False)
        self.kernel = kernel

    @classmethod
    def for_model(cls, model: torch.nn.Module, layers: list[torch.nn.Module]) -> RowBlockedWeights | None:
        """The row-blocked copies for a float32 CPU model the prepared weights support; None elsewhere, and
        where the kernel cannot be built (checked last: only then is the compiler run)."""
        if not cls.supports(model, layers):
            return None
        weight = model.lm_head.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            return None
        kernel = row_blocked_kernel()
        return None if kernel is None else cls(model, layers, kernel)._first_build()

    def _layout(self, weight: torch.Tensor) -> RowBlocked:
        return row_block(weight)

    def linear(self, x: torch.Tensor, weight: LaidOut) -> torch.Tensor:
        assert isinstance(weight, RowBlocked)
        return self.kernel.matmul(x, weight)


class ModuleProjections:
    """`ProjectionWeights`' calls on the modules' own weights: no copies, plain BLAS, always current.

    The decode step's other path (`path_choice`): at small batches BLAS's matrix-vector kernels stream a
    weight faster than oneDNN's blocked copies. Calling `F.linear` on the weights directly, not the
    modules, skips `Module.__call__` (7 per layer: 0.4-0.8 ms of a 31 ms SmolLM2 step at batch 1).
    Only made where `ProjectionWeights.build` accepted the model (bias-free, the usual names, `act_fn`).
    """

    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module]) -> None:
        self.model = model
        self.layers = layers

    def qkv_proj(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.layers[index].self_attn
        return F.linear(x, attn.q_proj.weight), F.linear(x, attn.k_proj.weight), F.linear(x, attn.v_proj.weight)

    def o_proj(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.layers[index].self_attn.o_proj.weight)

    def mlp(self, index: int, x: torch.Tensor, gate: Callable[[torch.Tensor], torch.Tensor] | None = None
            ) -> torch.Tensor:
        """As `ProjectionWeights.mlp`; there is no fused gate/up output here, so `gate` is not used."""
        mlp = self.layers[index].mlp
        return F.linear(mlp.act_fn(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight),
                        mlp.down_proj.weight)

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.model.lm_head.weight)


def grouped_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
                             ) -> torch.Tensor:
    """Attention of one new token per sequence, in float32: `q` [B, H, 1, D] over `keys`/`values`
    [B, KV, T, D] with the additive `bias` [B, 1, 1, T] (0 or -inf); returns [B, H, 1, D] in q's dtype.

    The H query heads are KV groups of H / KV sharing a key head (as `repeat_kv` lays them out), so
    two batched matmuls cover every head without copying a key. Used for bfloat16 on the CPU, where
    SDPA's kernel took 5.1 ms against 0.9 ms for this at 64 sequences x 64 positions (SmolLM2's heads),
    with the same error against a float32 reference (4e-3). Softmax scale 1/sqrt(D), as SDPA's.
    """
    bsz, heads, _, dim = q.shape
    kv = keys.shape[1]
    scores = torch.matmul(q.reshape(bsz, kv, heads // kv, dim).float(), keys.float().transpose(-1, -2))
    scores.mul_(dim ** -0.5).add_(bias)
    out = torch.matmul(torch.softmax(scores, dim=-1), values.float())
    return out.to(q.dtype).view(bsz, heads, 1, dim)
