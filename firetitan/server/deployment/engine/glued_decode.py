"""The decode step with the native glue (`decode_glue`) between its matmuls: which models it fits, and the step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from transformers.activations import SiLUActivation

from firetitan.server.deployment.engine.decode_glue import DecodeGlue
from firetitan.server.deployment.engine.ops import ModuleProjections, ProjectionWeights

if TYPE_CHECKING:  # runner.py imports this module
    from firetitan.server.deployment.engine.runner import ModelRunner


def norm_eps(module: torch.nn.Module | None) -> float | None:
    """The epsilon of an RMSNorm of the usual form (a float32 `weight`, `variance_epsilon`), else None."""
    eps = getattr(module, "variance_epsilon", None)
    weight = getattr(module, "weight", None)
    if eps is None or not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32 or weight.dim() != 1:
        return None
    return float(eps)


def glue_fits(runner: ModelRunner) -> bool:
    """Whether `DecodeGlue` computes this model's decode step: float32 on the CPU with prepared weights
    (bias-free projections of the usual names) and a rotary table, RMSNorms of the usual form, and
    q/k head norms, where present, with one epsilon."""
    if runner.proj is None or runner.rope is None or runner.dtype != torch.float32 or runner.device.type != "cpu":
        return False
    if runner.head_dim % 2 or runner.num_heads % runner.kv_heads:
        return False
    norms = [runner.inner.norm]
    for layer in runner.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        attn = layer.self_attn
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            if norm_eps(getattr(attn, "q_norm", None)) != norm_eps(getattr(attn, "k_norm", None)):
                return False
            norms += [attn.q_norm, attn.k_norm]
    return all(norm_eps(n) is not None for n in norms)


def silu_gate(glue: DecodeGlue | None, layers: list[torch.nn.Module]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The glue's `silu(gate) * up` where every layer's MLP activation is SiLU, else None."""
    if glue is None or not all(isinstance(layer.mlp.act_fn, (torch.nn.SiLU, SiLUActivation)) for layer in layers):
        return None
    return glue.silu_mul


def decode_glued(runner: ModelRunner, tokens: Sequence[int], proj: ProjectionWeights | ModuleProjections,
                 glue: DecodeGlue) -> torch.Tensor:
    """`ModelRunner._decode_fast` with everything between the matmuls in native calls: per layer one
    attention call (head norms, rotary, KV write, attention over each sequence's own positions) and two
    norm calls that also add the residual, instead of ~45 tensor ops. Same math; float rounding differs.
    Float32 on the CPU only (`glue_fits`), so the logits need no cast or copy."""
    bsz = len(tokens)
    cache = runner.cache
    lengths = cache.lengths[:bsz]
    cache.ensure_capacity(max(lengths) + 1)
    rope = runner.rope
    assert rope is not None
    pos = torch.tensor(lengths, dtype=torch.long)
    hidden = runner.inner.embed_tokens(torch.tensor(tokens, dtype=torch.long))  # [B, H], a fresh tensor
    x = torch.empty_like(hidden)
    attn_out = torch.empty(bsz, runner.num_heads * runner.head_dim)
    layers = runner.layers
    first = layers[0].input_layernorm
    glue.add_rms_norm(hidden, None, first.weight, first.variance_epsilon, x)
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        q, k, v = proj.qkv_proj(index, x)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        glue.attention(q, k, v, None if q_norm is None else q_norm.weight,
                       None if k_norm is None else k_norm.weight,
                       0.0 if q_norm is None else q_norm.variance_epsilon, rope.cos, rope.sin, pos,
                       cache.k[index], cache.v[index], attn_out)
        post = layer.post_attention_layernorm
        glue.add_rms_norm(hidden, proj.o_proj(index, attn_out), post.weight, post.variance_epsilon, x)
        after = layers[index + 1].input_layernorm if index + 1 < len(layers) else runner.inner.norm
        glue.add_rms_norm(hidden, proj.mlp(index, x, runner.gate), after.weight, after.variance_epsilon, x)
    for slot in range(bsz):
        cache.lengths[slot] += 1
    return proj.lm_head(x)
