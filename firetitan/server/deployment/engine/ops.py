"""Decode-step building blocks with fewer tensor ops than the transformers modules, bit-identical to them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


class FusedProjections:
    """Per layer, the q/k/v projections as one weight and the MLP's gate/up as one weight.

    A decode step at a small batch is bound by per-op overhead (and, with several threads, by one thread
    barrier per matmul), so 3 + 2 matmuls become 1 + 1 per layer. The fused weights are copies (memory:
    the q/k/v and gate/up weights once more); they are rebuilt whenever a source weight changed (a
    hot-load copies into the modules, which bumps each tensor's version), checked once per step.
    Only built for bias-free projections of the usual names; `None` from `build` means "use the modules".
    """

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        self.layers = layers
        self.qkv: list[torch.Tensor] = []
        self.gate_up: list[torch.Tensor] = []
        self.sizes: list[tuple[int, int, int]] = []
        self._key: list[tuple[int, int]] = []

    @classmethod
    def build(cls, layers: list[torch.nn.Module]) -> FusedProjections | None:
        for layer in layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                if getattr(getattr(layer.self_attn, name, None), "bias", 0) is not None:
                    return None
            for name in ("gate_proj", "up_proj", "down_proj"):
                if getattr(getattr(layer.mlp, name, None), "bias", 0) is not None:
                    return None
            if not hasattr(layer.mlp, "act_fn"):
                return None
        fused = cls(layers)
        try:
            fused.refresh()
        except RuntimeError:  # inference tensors keep no version counter: a change could not be seen
            return None
        return fused

    def _sources(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            out += [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, mlp.gate_proj.weight,
                    mlp.up_proj.weight]
        return out

    def _current_key(self) -> list[tuple[int, int]]:
        return [(w.data_ptr(), w._version) for w in self._sources()]

    def refresh(self) -> None:
        """Rebuild the fused weights if any source weight was replaced or written since the last build."""
        key = self._current_key()
        if key == self._key:
            return
        with torch.no_grad():
            self.qkv = [torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                   layer.self_attn.v_proj.weight]) for layer in self.layers]
            self.gate_up = [torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]) for layer in self.layers]
        self.sizes = [(layer.self_attn.q_proj.weight.shape[0], layer.self_attn.k_proj.weight.shape[0],
                       layer.self_attn.v_proj.weight.shape[0]) for layer in self.layers]
        self._key = key

    def qkv_proj(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nq, nk, _nv = self.sizes[index]
        qkv = F.linear(x, self.qkv[index])
        return qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]

    def mlp(self, index: int, x: torch.Tensor) -> torch.Tensor:
        mlp = self.layers[index].mlp
        gate_up = F.linear(x, self.gate_up[index])
        half = gate_up.shape[-1] // 2
        return mlp.down_proj(mlp.act_fn(gate_up[..., :half]) * gate_up[..., half:])
