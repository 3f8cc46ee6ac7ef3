"""The native glue between a forward's matmuls (`kernels/decode_glue.c`): RMSNorm fused with its residual
add, one layer's attention for a set of token rows (head norms, rotary embedding, KV write, softmax over
each row's own prefix: one new token per sequence in a decode step, every prompt position in a prefill),
and the gated SiLU between an MLP's matmuls.

Float32 on the CPU, built like the other native kernels (`native.load_kernel`) and checked against torch
once per process; `decode_glue()` is None where it cannot be built or disagrees, and the decode step then
keeps its torch ops. Callers pass float32 CPU tensors whose last dimension is contiguous (checked).
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from firetitan.server.deployment.engine.native import checked_kernel

_P = ctypes.c_void_p


def _rows(t: torch.Tensor) -> int:
    """Row stride (in floats) of a [rows, n] float32 tensor whose rows are contiguous."""
    if t.dtype != torch.float32 or t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(f"decode glue takes float32 [rows, n] with contiguous rows, got {t.dtype} "
                         f"{tuple(t.shape)} strides {t.stride()}")
    return t.stride(0)


class DecodeGlue:
    """ctypes calls into the compiled glue; each drops the GIL while it runs."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._norm = library.ft_add_rms_norm
        self._norm.argtypes = [_P, _P, _P, _P, ctypes.c_long, ctypes.c_long, ctypes.c_float, ctypes.c_int]
        self._norm.restype = None
        self._attention = library.ft_decode_attention
        self._attention.argtypes = [_P, ctypes.c_long, _P, ctypes.c_long, _P, ctypes.c_long, _P, _P, ctypes.c_float,
                                    _P, _P, ctypes.c_long, _P, _P, ctypes.c_long, _P, _P, ctypes.c_long, _P,
                                    ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._attention.restype = ctypes.c_int
        self._silu_mul = library.ft_silu_mul
        self._silu_mul.argtypes = [_P, ctypes.c_long, _P, ctypes.c_long, ctypes.c_long, ctypes.c_int]
        self._silu_mul.restype = None

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """`silu(gate) * up` of a fused gate/up projection's output [..., 2 * I] (gate first): [..., I]."""
        width = gate_up.shape[-1]
        flat = gate_up.reshape(-1, width)
        if width % 2 or flat.dtype != torch.float32 or flat.stride(-1) != 1:
            raise ValueError(f"silu_mul takes float32 [..., 2 * I] with contiguous rows, got {gate_up.dtype} "
                             f"{tuple(gate_up.shape)}")
        out = torch.empty(flat.shape[0], width // 2)
        self._silu_mul(flat.data_ptr(), flat.stride(0), out.data_ptr(), flat.shape[0], width // 2,
                       torch.get_num_threads())
        return out.view(*gate_up.shape[:-1], width // 2)

    def add_rms_norm(self, hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     out: torch.Tensor) -> None:
        """`hidden += delta` (in place; skipped when None), then `out = RMSNorm(hidden) * weight`, per row of
        the contiguous [rows, dim] `hidden` and `out`."""
        rows, dim = hidden.shape
        if not (hidden.is_contiguous() and out.is_contiguous() and out.shape == hidden.shape
                and weight.shape == (dim,) and weight.is_contiguous() and hidden.dtype == out.dtype == weight.dtype == torch.float32):
            raise ValueError(f"add_rms_norm takes contiguous float32 [rows, {dim}] and weight [{dim}]")
        if delta is not None:
            delta = delta.reshape(rows, dim)
            if not delta.is_contiguous() or delta.dtype != torch.float32:
                delta = delta.contiguous().float()
        self._norm(hidden.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                   out.data_ptr(), rows, dim, eps, torch.get_num_threads())

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: torch.Tensor | None,
                  k_norm: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                  slots: torch.Tensor | None = None) -> None:
        """One layer's attention for B token rows into `out` [B, heads * D]; writes their K/V into the caches.

        `q` [B, heads * D], `k`/`v` [B, kv_heads * D] (views with strided rows are fine), optional head-norm
        weights [D], rotary `cos`/`sin` tables [P, D] (sin's first half negated, as `RopeTable` keeps it),
        `positions` int64 [B] (row b's position in its sequence), caches [slots, kv_heads, capacity, D].
        `slots` int64 [B] names each row's KV row (a prefill: every position of a prompt in its slot); None
        means row b is slot b (a decode step). All rows' K/V are written before any row attends, so a row
        sees the rows before it in its own slot.
        """
        batch = positions.shape[0]
        num_slots, kv_heads, capacity, dim = k_cache.shape
        heads = q.shape[1] // dim
        if slots is not None and not (slots.dtype == torch.int64 and slots.is_contiguous() and slots.shape == (batch,)):
            raise ValueError("attention: slots must be contiguous int64 [rows]")
        if not (k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape
                and out.is_contiguous() and out.shape == (batch, heads * dim) and positions.dtype == torch.int64
                and positions.is_contiguous() and (slots is not None or batch <= num_slots)
                and k.shape[1] == v.shape[1] == kv_heads * dim
                and q.shape[0] == k.shape[0] == v.shape[0] == batch and cos.is_contiguous() and sin.is_contiguous()
                and cos.shape == sin.shape and cos.shape[1] == dim and k_cache.dtype == torch.float32):
            raise ValueError("decode attention: shapes, dtypes or layouts do not fit together")
        code = self._attention(q.data_ptr(), _rows(q), k.data_ptr(), _rows(k), v.data_ptr(), _rows(v),
                               None if q_norm is None else q_norm.data_ptr(),
                               None if k_norm is None else k_norm.data_ptr(), eps, cos.data_ptr(), sin.data_ptr(),
                               cos.shape[0], positions.data_ptr(), None if slots is None else slots.data_ptr(),
                               num_slots, k_cache.data_ptr(), v_cache.data_ptr(), capacity,
                               out.data_ptr(), batch, heads, kv_heads, dim, torch.get_num_threads())
        if code == -1:
            raise ValueError(f"decode attention: a position past the KV cache ({capacity}) or the rotary table "
                             f"({cos.shape[0]}), a slot past the cache's {num_slots}, or bad head counts")
        if code != 0:
            raise MemoryError("decode attention: no scratch memory")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: torch.Tensor | None,
                        k_norm: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                        positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slots: torch.Tensor | None = None) -> torch.Tensor:
    """`DecodeGlue.attention` in torch ops (writes the caches the same way); returns `out`. The probe's
    and the tests' reference."""
    batch = positions.shape[0]
    _, kv_heads, _, dim = k_cache.shape
    heads = q.shape[1] // dim
    half = dim // 2
    q = q.reshape(batch, heads, dim).clone()
    k = k.reshape(batch, kv_heads, dim).clone()
    if q_norm is not None:
        q = F.rms_norm(q, (dim,), q_norm, eps)
    if k_norm is not None:
        k = F.rms_norm(k, (dim,), k_norm, eps)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    q = q * c + torch.roll(q, half, dims=-1) * s
    k = k * c + torch.roll(k, half, dims=-1) * s
    out = torch.empty(batch, heads, dim)
    rows = range(batch) if slots is None else slots.tolist()
    for b, slot in enumerate(rows):  # every row's K/V first, as the kernel writes them
        p = int(positions[b])
        k_cache[slot, :, p] = k[b]
        v_cache[slot, :, p] = v[b].reshape(kv_heads, dim)
    for b, slot in enumerate(rows):
        p = int(positions[b])
        keys = k_cache[slot, :, : p + 1].repeat_interleave(heads // kv_heads, dim=0)
        values = v_cache[slot, :, : p + 1].repeat_interleave(heads // kv_heads, dim=0)
        out[b] = F.scaled_dot_product_attention(q[b].unsqueeze(1), keys, values).squeeze(1)
    return out.reshape(batch, heads * dim)


def _probe(glue: DecodeGlue) -> bool:
    """The glue equals torch on small shapes: uneven positions, grouped heads, head norms on and off."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim, capacity = 3, 4, 2, 32, 40
    for norms in (False, True):
        q = torch.randn(batch, heads * dim, generator=gen)
        kv = torch.randn(batch, 2 * kv_heads * dim, generator=gen)
        k, v = kv[:, : kv_heads * dim], kv[:, kv_heads * dim:]
        q_norm = torch.rand(dim, generator=gen) + 0.5 if norms else None
        k_norm = torch.rand(dim, generator=gen) + 0.5 if norms else None
        cos, sin = torch.randn(capacity, dim, generator=gen), torch.randn(capacity, dim, generator=gen)
        positions = torch.tensor([0, 17, 39])
        caches = [torch.randn(batch, kv_heads, capacity, dim, generator=gen) for _ in range(2)]
        mine = [c.clone() for c in caches]
        out = torch.empty(batch, heads * dim)
        glue.attention(q, k, v, q_norm, k_norm, 1e-6, cos, sin, positions, mine[0], mine[1], out)
        want = reference_attention(q, k, v, q_norm, k_norm, 1e-6, cos, sin, positions, *caches)
        if not (torch.allclose(out, want, atol=1e-4, rtol=1e-4)
                and all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(mine, caches, strict=True))):
            return False
        # Prefill-shaped: the 5 positions of a prompt in slot 2 and 2 of one in slot 0, read causally.
        slots, positions = torch.tensor([2, 2, 2, 2, 2, 0, 0]), torch.tensor([0, 1, 2, 3, 4, 0, 1])
        q = torch.randn(7, heads * dim, generator=gen)
        kv = torch.randn(7, 2 * kv_heads * dim, generator=gen)
        k, v = kv[:, : kv_heads * dim], kv[:, kv_heads * dim:]
        mine = [c.clone() for c in caches]
        out = torch.empty(7, heads * dim)
        glue.attention(q, k, v, q_norm, k_norm, 1e-6, cos, sin, positions, mine[0], mine[1], out, slots=slots)
        want = reference_attention(q, k, v, q_norm, k_norm, 1e-6, cos, sin, positions, *caches, slots=slots)
        if not (torch.allclose(out, want, atol=1e-4, rtol=1e-4)
                and all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(mine, caches, strict=True))):
            return False
    hidden, delta, weight = torch.randn(5, 40, generator=gen), torch.randn(5, 40, generator=gen), torch.rand(40) + 0.5
    out = torch.empty_like(hidden)
    want = F.rms_norm(hidden + delta, (40,), weight, 1e-5)
    glue.add_rms_norm(hidden, delta, weight, 1e-5, out)
    gate_up = torch.randn(3, 2 * 37, generator=gen) * 8  # an odd width: the vector loop and its tail
    silu = F.silu(gate_up[:, :37]) * gate_up[:, 37:]
    return bool(torch.allclose(out, want, atol=1e-5, rtol=1e-5)
                and torch.allclose(glue.silu_mul(gate_up), silu, atol=1e-5, rtol=1e-5))


@functools.cache
def decode_glue() -> DecodeGlue | None:
    """The compiled glue for this machine; None where it cannot be built or disagrees with torch."""
    return checked_kernel("decode_glue", DecodeGlue, _probe)
