"""The decode step and prefill with the native glue (`decode_glue`) between their matmuls: which models it
fits, and the two forwards."""

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


def _glued_layers(runner: ModelRunner, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None,
                  proj: ProjectionWeights | ModuleProjections, glue: DecodeGlue) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decoder layer over the token rows `ids` [N] at `positions` [N] of KV rows `slots` [N] (None: row
    b in slot b) with everything between the matmuls in native calls: per layer one attention call (head
    norms, rotary, KV write, attention over each row's own prefix) and two norm calls that also add the
    residual, instead of ~45 tensor ops. Returns the last hidden state [N, H] and its final norm."""
    rope = runner.rope
    assert rope is not None
    cache = runner.cache
    hidden = runner.inner.embed_tokens(ids)  # [N, H], a fresh tensor
    x = torch.empty_like(hidden)
    attn_out = torch.empty(ids.shape[0], runner.num_heads * runner.head_dim)
    layers = runner.layers
    first = layers[0].input_layernorm
    glue.add_rms_norm(hidden, None, first.weight, first.variance_epsilon, x)
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        q, k, v = proj.qkv_proj(index, x)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        glue.attention(q, k, v, None if q_norm is None else q_norm.weight,
                       None if k_norm is None else k_norm.weight,
                       0.0 if q_norm is None else q_norm.variance_epsilon, rope.cos, rope.sin, positions,
                       cache.k[index], cache.v[index], attn_out, slots=slots)
        post = layer.post_attention_layernorm
        glue.add_rms_norm(hidden, proj.o_proj(index, attn_out), post.weight, post.variance_epsilon, x)
        after = layers[index + 1].input_layernorm if index + 1 < len(layers) else runner.inner.norm
        glue.add_rms_norm(hidden, proj.mlp(index, x, runner.gate), after.weight, after.variance_epsilon, x)
    return hidden, x


def decode_glued(runner: ModelRunner, tokens: Sequence[int], proj: ProjectionWeights | ModuleProjections,
                 glue: DecodeGlue) -> torch.Tensor:
    """`ModelRunner._decode_fast` through `_glued_layers`: one new token per sequence in slots 0..B-1.
    Same math; float rounding differs. Float32 on the CPU only (`glue_fits`), so the logits need no cast
    or copy."""
    cache = runner.cache
    lengths = cache.lengths[: len(tokens)]
    cache.ensure_capacity(max(lengths) + 1)
    _, normed = _glued_layers(runner, torch.tensor(tokens, dtype=torch.long), torch.tensor(lengths, dtype=torch.long),
                              None, proj, glue)
    for slot in range(len(tokens)):
        cache.lengths[slot] += 1
    return proj.lm_head(normed)


def prefill_glued(runner: ModelRunner, prompts: Sequence[Sequence[int]], slots: Sequence[int], starts: Sequence[int],
                  proj: ProjectionWeights, glue: DecodeGlue) -> torch.Tensor:
    """Prompt tokens through `_glued_layers`, unpadded: prompt i's tokens at positions starts[i].. of KV row
    slots[i], attending causally to that row's earlier positions (cached or in this call). The caller has
    made the cache long enough and sets the lengths. Returns the last hidden states [B, longest, H], zero
    past each prompt's end (no padding is computed: every matmul and attention runs on real tokens only)."""
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    ids = torch.tensor([token for prompt in prompts for token in prompt], dtype=torch.long)
    rows = torch.repeat_interleave(torch.tensor(list(slots), dtype=torch.long), lengths)
    positions = torch.cat([torch.arange(start, start + len(p), dtype=torch.long)
                           for p, start in zip(prompts, starts, strict=True)])
    hidden, _ = _glued_layers(runner, ids, positions, rows, proj, glue)
    longest = int(lengths.max())
    if bool((lengths == longest).all()):
        return hidden.view(len(prompts), longest, -1)
    padded = hidden.new_zeros(len(prompts), longest, hidden.shape[-1])
    for i, part in enumerate(torch.split(hidden, lengths.tolist())):
        padded[i, : part.shape[0]] = part
    return padded
