"""The decode step's native glue: attention, norms and the gated SiLU equal torch's, and a runner using them
decodes to the reference step's logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from firetitan.models import load_model
from firetitan.server.deployment.engine.decode_glue import DecodeGlue, decode_glue, reference_attention
from firetitan.server.deployment.engine.runner import DecodeOptions, ModelRunner

NANO = "firetitan/nano-qwen3"


def _glue() -> DecodeGlue:
    glue = decode_glue()
    assert glue is not None, "gcc builds the glue on every machine this suite runs on"
    return glue


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "norms"), [(4, 2, 32, True), (9, 3, 64, False), (2, 2, 16, True),
                                                                 (8, 1, 128, False)])
def test_attention_equals_torch_and_writes_only_the_new_rows(heads: int, kv_heads: int, dim: int, norms: bool) -> None:
    """Grouped heads (1 to 8 per KV head), head norms on and off, q/k/v as strided views of one fused
    projection, positions from 0 to the cache's last, and more slots than sequences."""
    glue = _glue()
    gen = torch.Generator().manual_seed(heads * dim)
    capacity, batch = 70, 5
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=gen)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
    q_norm = torch.rand(dim, generator=gen) + 0.5 if norms else None
    k_norm = torch.rand(dim, generator=gen) + 0.5 if norms else None
    cos, sin = torch.randn(capacity, dim, generator=gen), torch.randn(capacity, dim, generator=gen)
    positions = torch.tensor([0, 69, 1, 33, 16])
    caches = [torch.randn(batch + 2, kv_heads, capacity, dim, generator=gen) for _ in range(2)]
    mine = [c.clone() for c in caches]
    out = torch.empty(batch, heads * dim)
    glue.attention(q, k, v, q_norm, k_norm, 1e-6, cos, sin, positions, mine[0], mine[1], out)
    want = reference_attention(q, k, v, q_norm, k_norm, 1e-6, cos, sin, positions, *caches)
    assert torch.allclose(out, want, atol=2e-5, rtol=1e-4), (out - want).abs().max()
    for got, ref in zip(mine, caches, strict=True):  # the reference wrote the same new rows, nothing else changed
        assert torch.allclose(got, ref, atol=1e-6, rtol=1e-5), (got - ref).abs().max()


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "norms"), [(9, 3, 64, False), (4, 2, 128, True)])
def test_prefill_rows_attend_causally_within_their_own_slot(heads: int, kv_heads: int, dim: int, norms: bool) -> None:
    """Rows naming their slots (a prefill): prompts of 40 and 3 positions in slots 3 and 0, and a chunk at
    positions 20-24 of slot 1 over its cached prefix, in one call, equal the torch reference, which
    writes every row's K/V before any row attends; a row never sees a later position or another slot."""
    glue = _glue()
    gen = torch.Generator().manual_seed(dim)
    capacity = 64
    slots = torch.tensor([3] * 40 + [0] * 3 + [1] * 5)
    positions = torch.cat([torch.arange(40), torch.arange(3), torch.arange(20, 25)])
    rows = slots.shape[0]
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=gen)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
    q_norm = torch.rand(dim, generator=gen) + 0.5 if norms else None
    k_norm = torch.rand(dim, generator=gen) + 0.5 if norms else None
    cos, sin = torch.randn(capacity, dim, generator=gen), torch.randn(capacity, dim, generator=gen)
    caches = [torch.randn(4, kv_heads, capacity, dim, generator=gen) for _ in range(2)]
    mine = [c.clone() for c in caches]
    out = torch.empty(rows, heads * dim)
    glue.attention(q, k, v, q_norm, k_norm, 1e-6, cos, sin, positions, mine[0], mine[1], out, slots=slots)
    want = reference_attention(q, k, v, q_norm, k_norm, 1e-6, cos, sin, positions, *caches, slots=slots)
    assert torch.allclose(out, want, atol=2e-5, rtol=1e-4), (out - want).abs().max()
    for got, ref in zip(mine, caches, strict=True):
        assert torch.allclose(got, ref, atol=1e-6, rtol=1e-5), (got - ref).abs().max()
    # Causal: the first row of the 40-token prompt sees only itself, so its output is its own value row.
    own_value = v[0, :dim]
    assert torch.allclose(out[0, :dim], own_value, atol=1e-5)
    with pytest.raises(ValueError, match="slot past the cache"):
        glue.attention(q, k, v, None, None, 1e-6, cos, sin, positions, mine[0], mine[1], out,
                       slots=torch.where(slots == 3, 4, slots))


def test_attention_refuses_a_position_past_the_cache_or_mismatched_shapes() -> None:
    glue = _glue()
    q, k, v = torch.randn(2, 4 * 8), torch.randn(2, 2 * 8), torch.randn(2, 2 * 8)
    cos, sin = torch.randn(16, 8), torch.randn(16, 8)
    caches = [torch.zeros(2, 2, 10, 8) for _ in range(2)]
    out = torch.empty(2, 32)
    with pytest.raises(ValueError, match="past the KV cache"):
        glue.attention(q, k, v, None, None, 1e-6, cos, sin, torch.tensor([3, 10]), *caches, out)
    with pytest.raises(ValueError, match="do not fit"):
        glue.attention(q, k[:, :8], v, None, None, 1e-6, cos, sin, torch.tensor([3, 4]), *caches, out)
    assert torch.all(caches[0] == 0) and torch.all(caches[1] == 0)  # nothing was written


def test_add_rms_norm_adds_in_place_then_normalises() -> None:
    glue = _glue()
    gen = torch.Generator().manual_seed(0)
    hidden, delta = torch.randn(7, 576, generator=gen), torch.randn(7, 576, generator=gen)
    weight, out = torch.rand(576, generator=gen) + 0.5, torch.empty(7, 576)
    summed = hidden + delta
    glue.add_rms_norm(hidden, delta, weight, 1e-5, out)
    assert torch.allclose(hidden, summed)
    assert torch.allclose(out, F.rms_norm(summed, (576,), weight, 1e-5), atol=1e-6, rtol=1e-5)
    glue.add_rms_norm(hidden, None, weight, 1e-5, out)  # no residual: the norm alone, hidden untouched
    assert torch.allclose(hidden, summed)
    assert torch.allclose(out, F.rms_norm(summed, (576,), weight, 1e-5), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="contiguous float32"):
        glue.add_rms_norm(hidden.T, None, weight, 1e-5, out.T)


@pytest.mark.parametrize("width", [1536, 37, 16, 1])
def test_silu_mul_equals_torch_including_large_inputs(width: int) -> None:
    """Vector loop and tail; inputs up to +-120 (exp saturates) stay finite and exact in the limit."""
    glue = _glue()
    gen = torch.Generator().manual_seed(width)
    for rows in (1, 3, 64):  # 64 x 1536 splits rows across threads
        gate_up = torch.randn(rows, 1, 2 * width, generator=gen) * 40
        got = glue.silu_mul(gate_up)
        want = F.silu(gate_up[..., :width]) * gate_up[..., width:]
        assert got.shape == (rows, 1, width)
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def _llama() -> torch.nn.Module:
    """A random Llama-shaped model (no head norms; 3 query heads per KV head, as SmolLM2 has)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("make_model", [lambda: load_model(NANO), _llama], ids=["qwen3", "llama"])
def test_a_runner_with_the_glue_decodes_to_the_reference(make_model) -> None:  # type: ignore[no-untyped-def]
    """Through each matmul path (prepared, the modules', row-blocked), batches of 1 and 3 at uneven lengths,
    the glued decode step equals the modules-only reference step; with `fused_decode=False` there is no glue."""
    model = make_model()
    runner = ModelRunner(model, max_slots=4)
    assert runner.glue is not None and runner.gate is not None
    assert ModelRunner(model, max_slots=4, options=DecodeOptions(fused_decode=False)).glue is None
    for prompts in ([[1, 5, 6, 7]], [[1, 5, 6, 7], [1, 30], [1, *range(40, 60)]]):
        runs = {}
        for path in ("reference", "prepared", "modules", "row_blocked"):
            runner.cache.reset()
            runner.prefill(runner.cache.allocate(len(prompts)), prompts)
            toks, rows = [3] * len(prompts), []
            for _ in range(5):
                with torch.inference_mode():
                    if path == "reference":
                        logits = runner._decode_modules(toks)
                    else:
                        proj = {"prepared": runner._projections(), "modules": runner.module_proj,
                                "row_blocked": runner.row_blocked}[path]
                        assert proj is not None
                        if path == "row_blocked":
                            proj.refresh()  # as `decode` does before using them
                        logits = runner._decode_fast(toks, proj)
                rows.append(logits)
                toks = logits.argmax(-1).tolist()
            runs[path] = torch.stack(rows)
        for path, got in runs.items():
            assert torch.allclose(got, runs["reference"], atol=1e-5), (path, (got - runs["reference"]).abs().max())
