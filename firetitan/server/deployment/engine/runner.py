"""Model runner: batched prefill and decode of a Qwen3-style transformers model over a slot KV cache."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

from firetitan.errors import ConfigError
from firetitan.server.deployment.engine.batch_packs import BatchPacks
from firetitan.server.deployment.engine.decode_glue import decode_glue
from firetitan.server.deployment.engine.glued_decode import decode_glued, glue_fits, prefill_glued, silu_gate
from firetitan.server.deployment.engine.kv_cache import SlotKVCache
from firetitan.server.deployment.engine.ops import (
    ModuleProjections,
    ProjectionWeights,
    RopeTable,
    RowBlockedWeights,
    grouped_decode_attention,
    mkl_packing_works,
    rms_norm,
)
from firetitan.server.deployment.engine.path_choice import (
    MODULES,
    PACKED,
    PREPARED,
    ROW_BLOCKED,
    DecodePathChooser,
)
from firetitan.server.deployment.engine.request import EngineRequest, TokenOut
from firetitan.server.deployment.engine.sampler import sample
from firetitan.server.deployment.engine.scheduler import RunnerOutput, StepDecision

# From this many token rows up, prefills share one path choice: both matmul paths run at their large-matrix
# speed there (measured: 190-219 GFLOP/s from 256 to 2,016 rows), so the choice is made after 6 prefills of
# any such size instead of 6 per power of two (a 64-request burst's ~2,000-row prefill comes once a burst).
PREFILL_ROWS_SHARING_A_KEY = 128


@dataclass(frozen=True)
class DecodeOptions:
    """How the decode step may run; each option applies to float32 models on the CPU and does nothing
    elsewhere. The defaults are the fastest measured (docs/deployment.md)."""

    batch_packs: int = 1  # weight copies MKL-packed for a recurring batch size, at most this many (0: none)
    native_matmul: bool = True  # offer decode and prefill the native row-blocked matmul (`native`)
    fused_decode: bool = True  # attention, norms and residual adds as native calls (`decode_glue`)


def kv_row_positions(max_positions: int, max_slots: int, max_kv_tokens: int | None) -> int:
    """The longest sequence served: the model's context, or less so that every KV row (the slots and the
    staging row) at that length fits in `max_kv_tokens` positions (the KV memory bound)."""
    if max_kv_tokens is None:
        return max_positions
    per_row = max_kv_tokens // (max_slots + 1)
    if per_row < 2:
        raise ConfigError(f"--max-kv-tokens {max_kv_tokens} leaves under 2 positions for each of "
                          f"{max_slots + 1} KV rows (--max-running-seqs + 1)", field="max_kv_tokens")
    return min(max_positions, per_row)


class ModelRunner:
    """Computes logits; decides nothing.

    Runs the model's own modules (embeddings, norms, projections, rotary embedding, MLP, lm_head) with
    our attention over `SlotKVCache`, so hot-loaded weights (copied into those modules) are used as is.
    Supports Qwen2/Qwen3/Llama-shaped decoders with full attention. Everything runs under
    `torch.inference_mode` (no version counters or view tracking: ~6-15% less CPU per decode step than
    `no_grad` on a small model), so the KV cache and stored prompt logits are inference tensors: only
    the runner's own (decorated) methods write them.
    """

    def __init__(self, model: torch.nn.Module, max_slots: int, seed: int = 0, max_kv_tokens: int | None = None,
                 options: DecodeOptions = DecodeOptions()) -> None:
        cfg = model.config
        layer_types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ConfigError("only full-attention models are supported by the deployment engine",
                              field="base_model")
        self.model = model
        self.config = cfg
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_positions = int(cfg.max_position_embeddings)
        self.vocab_size = int(cfg.vocab_size)
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device  # the KV cache and inputs follow the weights
        self.generator = torch.Generator().manual_seed(seed)  # for requests without their own seed
        self.max_positions = kv_row_positions(self.max_positions, max_slots, max_kv_tokens)
        self.cache = SlotKVCache(len(self.layers), max_slots, self.kv_heads, self.head_dim, self.dtype,
                                 max_capacity=self.max_positions, device=self.device)
        rotary = self.inner.rotary_emb
        self.rope = (RopeTable(rotary, self.max_positions, self.head_dim, self.dtype, self.device)
                     if RopeTable.supports(rotary) else None)
        self.proj = ProjectionWeights.build(model, self.layers) if self.rope is not None else None
        self.module_proj = ModuleProjections(model, self.layers) if self.proj is not None else None
        # Batch-shaped weights for recurring batch sizes, at most `options.batch_packs` of them (0: none).
        self.packs = (BatchPacks(model, self.layers, max_packs=options.batch_packs)
                      if options.batch_packs > 0 and self.proj is not None and mkl_packing_works(self.dtype, self.device)
                      else None)
        # Row-blocked weights for the native matmul (float32 CPU, where it compiles), offered to the path
        # choices of decode (every batch size) and prefill.
        self.row_blocked = (RowBlockedWeights.for_model(model, self.layers)
                            if options.native_matmul and self.proj is not None else None)
        self.decode_paths = DecodePathChooser()
        self.prefill_paths = DecodePathChooser()  # keyed by the bucket of a prefill's token rows
        # The decode step's attention, norms and residual adds as native fused calls (float32 CPU models
        # of the usual shape, where the glue compiles); None keeps the torch ops.
        self.glue = decode_glue() if options.fused_decode and glue_fits(self) else None
        # Its gated SiLU between the MLP matmuls of prefill and decode, where every layer's act_fn is SiLU.
        self.gate = silu_gate(self.glue, self.layers)

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor, proj: ProjectionWeights | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of `positions` [B, T]: from the rotary table ([B, 1, T, D], for `RopeTable.apply`)
        where there are prepared weights (made only where the table is), else the model's module's."""
        if proj is not None and self.rope is not None:
            return self.rope.cos[positions].unsqueeze(1), self.rope.sin[positions].unsqueeze(1)
        return self.inner.rotary_emb(hidden, positions)

    def _attention_block(self, index: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         proj: ProjectionWeights | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V for the layer's input `hidden` [B, T, H] (normed here) after head norms and rotary
        embedding: [B, heads, T, D].

        With `proj` (prepared weights) norms and rotary run as the decode step's fused ops (`cos`/`sin`
        from `_rotary`): the same bits in float32, fewer tensor ops; without, the model's modules."""
        layer = self.layers[index]
        attn = layer.self_attn
        bsz, seq, _ = hidden.shape
        shape = (bsz, seq, -1, self.head_dim)
        hidden = rms_norm(layer.input_layernorm, hidden) if proj is not None else layer.input_layernorm(hidden)
        if proj is not None:
            q, k, v = proj.qkv_proj(index, hidden)
        else:
            q, k, v = attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden)
        q, k = q.reshape(shape), k.reshape(shape)
        if hasattr(attn, "q_norm"):
            q, k = (rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)) if proj is not None else (
                attn.q_norm(q), attn.k_norm(k))
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.reshape(shape).transpose(1, 2)
        if proj is not None and self.rope is not None:
            return self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin), v
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def _layer_tail(self, index: int, residual: torch.Tensor, attn_out: torch.Tensor,
                    proj: ProjectionWeights | None) -> torch.Tensor:
        layer = self.layers[index]
        bsz, seq = attn_out.shape[0], attn_out.shape[2]
        attn_out = attn_out.transpose(1, 2).reshape(bsz, seq, -1)
        if proj is None:
            hidden = residual + layer.self_attn.o_proj(attn_out)
            return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = residual + proj.o_proj(index, attn_out)
        return hidden + proj.mlp(index, rms_norm(layer.post_attention_layernorm, hidden), self.gate)

    def _projections(self) -> ProjectionWeights | None:
        """The prepared projection weights, rebuilt first if a hot-load changed the model's."""
        if self.proj is not None:
            self.proj.refresh()
        return self.proj

    def _logits(self, hidden: torch.Tensor, proj: ProjectionWeights | None) -> torch.Tensor:
        """Logits of `hidden` (float32, on the CPU: sampling uses seeded CPU generators) through the weights
        `proj` the forward that made `hidden` ran on (and refreshed), or the model's own lm_head if None."""
        normed = self.inner.norm(hidden)
        return (proj.lm_head(normed) if proj is not None else self.model.lm_head(normed)).float().cpu()

    @torch.inference_mode()
    def prefill(self, slots: range, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run the prompts in fresh contiguous `slots`; returns last-position logits [B, V]."""
        hidden, proj = self._prefill_hidden(slots, prompts)
        last = torch.tensor([len(p) for p in prompts], device=self.device) - 1
        return self._logits(hidden[torch.arange(len(prompts), device=self.device), last].unsqueeze(1), proj).squeeze(1)

    def _prefill_projections(self, rows: int) -> tuple[tuple[str, int] | None, str, ProjectionWeights | None]:
        """The weights a prefill of `rows` token rows runs on: the prepared or the row-blocked ones, as
        `prefill_paths` timed faster per row for rows of this size (alternating until each has its
        trials; from `PREFILL_ROWS_SHARING_A_KEY` rows up one key); returns the key and path to record
        the timing under (key None: nothing to choose)."""
        small = self.row_blocked  # made only where prepared weights are
        if small is None:
            return None, PREPARED, self._projections()
        key = self.prefill_paths.bucket(min(rows, PREFILL_ROWS_SHARING_A_KEY))
        path = self.prefill_paths.pick(key, (PREPARED, ROW_BLOCKED))
        if path == ROW_BLOCKED:
            small.refresh()
            return key, path, small
        return key, path, self._projections()

    def _timed_prefill(self, rows: int, forward: Callable[[ProjectionWeights | None], torch.Tensor]
                       ) -> tuple[torch.Tensor, ProjectionWeights | None]:
        """`forward` on the weights `_prefill_projections` picks for `rows` token rows, its time per row
        recorded for that choice; returns its hidden states and the weights."""
        key, path, proj = self._prefill_projections(rows)
        started = time.perf_counter()
        hidden = forward(proj)
        if key is not None:
            self.prefill_paths.record(key, path, (time.perf_counter() - started) / rows)
        return hidden, proj

    def _prefill_hidden(self, slots: range, prompts: Sequence[Sequence[int]]
                        ) -> tuple[torch.Tensor, ProjectionWeights | None]:
        """Fill the KV rows of `slots` with the prompts; returns the final hidden states [B, T, H] and the
        weights they were computed with. With the native glue the prompts run unpadded
        (`glued_decode.prefill_glued`); else through `_prefill_padded`.
        """
        lengths = [len(p) for p in prompts]
        self.cache.ensure_capacity(max(lengths) + 1)
        glue = self.glue

        def forward(proj: ProjectionWeights | None) -> torch.Tensor:
            if glue is not None and proj is not None:
                return prefill_glued(self, prompts, slots, [0] * len(prompts), proj, glue)
            return self._prefill_padded(slots, prompts, proj)

        result = self._timed_prefill(sum(lengths) if glue is not None else len(prompts) * max(lengths), forward)
        for slot, length in zip(slots, lengths, strict=True):
            self.cache.lengths[slot] = length
        return result

    def _prefill_padded(self, slots: range, prompts: Sequence[Sequence[int]], proj: ProjectionWeights | None
                        ) -> torch.Tensor:
        """`_prefill_hidden` in torch ops. Prompts are right-padded to the longest: with a causal mask the
        padding sits after every real token, so it never changes them; its keys are written past each
        sequence's length and are masked out (then overwritten) by decode."""
        longest = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        ids = ids.to(self.device)
        positions = torch.arange(longest, device=self.device).unsqueeze(0).expand(len(prompts), -1)
        hidden = self.inner.embed_tokens(ids)
        first, end = slots.start, slots.stop
        cos, sin = self._rotary(hidden, positions, proj)
        for index in range(len(self.layers)):
            residual = hidden
            q, k, v = self._attention_block(index, hidden, cos, sin, proj)
            self.cache.k[index][first:end, :, :longest] = k
            self.cache.v[index][first:end, :, :longest] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.num_heads)
            hidden = self._layer_tail(index, residual, out, proj)
        return hidden

    def _prefill_chunk(self, slot: int, tokens: Sequence[int], start: int
                       ) -> tuple[torch.Tensor, ProjectionWeights | None]:
        """Prompt positions [start, start + len(tokens)) into `slot`, attending to the cached prefix; returns
        the hidden states and the weights they were computed with (as `_prefill_hidden`)."""
        count = len(tokens)
        end = start + count
        self.cache.ensure_capacity(end + 1)
        glue = self.glue

        def forward(proj: ProjectionWeights | None) -> torch.Tensor:
            if glue is not None and proj is not None:
                return prefill_glued(self, [tokens], [slot], [start], proj, glue)
            return self._prefill_chunk_torch(slot, tokens, start, proj)

        result = self._timed_prefill(count, forward)
        self.cache.lengths[slot] = end
        return result

    def _prefill_chunk_torch(self, slot: int, tokens: Sequence[int], start: int, proj: ProjectionWeights | None
                             ) -> torch.Tensor:
        """`_prefill_chunk` in torch ops: SDPA over the cached prefix with an explicit causal mask."""
        count = len(tokens)
        end = start + count
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        positions = torch.arange(start, end, device=self.device).unsqueeze(0)
        hidden = self.inner.embed_tokens(ids)
        mask = (torch.arange(end, device=self.device).unsqueeze(0) <= positions.squeeze(0).unsqueeze(1)
                ).view(1, 1, count, end)
        cos, sin = self._rotary(hidden, positions, proj)
        for index in range(len(self.layers)):
            residual = hidden
            q, k, v = self._attention_block(index, hidden, cos, sin, proj)
            self.cache.k[index][slot, :, start:end] = k[0]
            self.cache.v[index][slot, :, start:end] = v[0]
            keys = self.cache.k[index][slot : slot + 1, :, :end]
            values = self.cache.v[index][slot : slot + 1, :, :end]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                 enable_gqa=self.kv_heads != self.num_heads)
            hidden = self._layer_tail(index, residual, out, proj)
        return hidden

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """One step for the sequences in slots 0..B-1 (B = len(tokens)); returns logits [B, V].

        Token i is written at position `lengths[i]` of slot i; attention covers each slot's own prefix.
        Per-step overhead, not arithmetic, bounds a small model here, so the step is written with few
        tensor ops: fused norms, one rotary-table lookup per step, one `index_copy_` per KV write.
        The projections run through the prepared weights, the model's own modules, for a batch size
        decode keeps running at weights packed for that size (`batch_packs`), or the native kernel's
        row-blocked weights (`native`): whichever `decode_paths` timed fastest for this batch size
        (`path_choice`).
        """
        if self.rope is None:
            return self._decode_modules(tokens)
        if self.module_proj is None:  # made exactly where prepared weights are
            return self._decode_fast(tokens, None)
        batch = len(tokens)
        chooser = self.decode_paths
        pack = None
        if self.packs is not None:
            self.packs.observe(batch)
            pack = self.packs.get(batch)
        key, paths = chooser.bucket(batch), (PREPARED, MODULES)
        small = self.row_blocked
        if small is not None:
            paths += (ROW_BLOCKED,)
        if pack is not None:  # the pack against the bucket's winner (both others until that is known)
            best = chooser.chosen.get(key)
            # The pack goes last in each round: just written, it sits partly in the CPU's cache, and a
            # step through it right away read its weights faster than later ones would (at batch 1 that
            # made a slower pack win its trials); a step through the other weights evicts it first.
            key, paths = chooser.exact(batch), ((best,) if best else paths) + (PACKED,)
        path = chooser.pick(key, paths)
        proj: ProjectionWeights | ModuleProjections | None
        if path == PACKED:
            proj = pack
        elif path == ROW_BLOCKED:
            assert small is not None
            small.refresh()
            proj = small
        else:
            proj = self._projections() if path == PREPARED else self.module_proj
        started = time.perf_counter()
        logits = self._decode_fast(tokens, proj)
        chosen = chooser.record(key, path, time.perf_counter() - started)
        if self.packs is not None and pack is not None and chosen not in (None, PACKED):
            self.packs.decline(batch)
        return logits

    def _decode_fast(self, tokens: Sequence[int], proj: ProjectionWeights | ModuleProjections | None
                     ) -> torch.Tensor:
        """`decode` with the rotary table; projections through `proj`, or by calling the modules if None
        (models `ProjectionWeights` does not take). With the native glue (`self.glue`) the work between the
        matmuls runs there (`glued_decode.decode_glued`), else as the torch ops below."""
        if self.glue is not None and proj is not None:
            return decode_glued(self, tokens, proj, self.glue)
        bsz = len(tokens)
        cache = self.cache
        lengths = cache.lengths[:bsz]
        span = max(lengths) + 1
        cache.ensure_capacity(span)
        pos = torch.tensor(lengths, dtype=torch.long, device=self.device)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        hidden = self.inner.embed_tokens(ids)
        cos, sin = self.rope.lookup(pos)
        mask = (torch.arange(span, device=self.device).unsqueeze(0) <= pos.unsqueeze(1)).view(bsz, 1, 1, span)
        grouped = self.device.type == "cpu" and self.dtype != torch.float32
        if grouped:
            bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        # Row (slot b, head h, position pos[b]) of a layer's cache seen as [slots * heads * capacity, D].
        heads = torch.arange(self.kv_heads, device=self.device)
        flat = ((torch.arange(bsz, device=self.device).unsqueeze(1) * self.kv_heads + heads) * cache.capacity
                + pos.unsqueeze(1)).view(-1)
        gqa = self.kv_heads != self.num_heads
        q_shape = (bsz, 1, self.num_heads, self.head_dim)
        kv_shape = (bsz, 1, self.kv_heads, self.head_dim)
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = rms_norm(layer.input_layernorm, hidden)
            if proj is not None:
                q, k, v = proj.qkv_proj(index, x)
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q, k, v = q.view(q_shape), k.view(kv_shape), v.view(kv_shape)
            if hasattr(attn, "q_norm"):
                q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
            q = self.rope.apply(q.transpose(1, 2), cos, sin)
            k = self.rope.apply(k.transpose(1, 2), cos, sin)
            keys, values = cache.k[index], cache.v[index]
            keys.view(-1, self.head_dim).index_copy_(0, flat, k.reshape(-1, self.head_dim))
            values.view(-1, self.head_dim).index_copy_(0, flat, v.reshape(-1, self.head_dim))
            if grouped:
                out = grouped_decode_attention(q, keys[:bsz, :, :span], values[:bsz, :, :span], bias)
            else:
                out = F.scaled_dot_product_attention(q, keys[:bsz, :, :span], values[:bsz, :, :span],
                                                     attn_mask=mask, enable_gqa=gqa)
            attn_out = out.transpose(1, 2).reshape(bsz, 1, -1)
            hidden = hidden + (proj.o_proj(index, attn_out) if proj is not None else attn.o_proj(attn_out))
            x = rms_norm(layer.post_attention_layernorm, hidden)
            hidden = hidden + (proj.mlp(index, x) if proj is not None else layer.mlp(x))
        for slot in range(bsz):
            cache.lengths[slot] += 1
        normed = rms_norm(self.inner.norm, hidden)
        return (proj.lm_head(normed) if proj is not None else self.model.lm_head(normed)).float().cpu().squeeze(1)

    @torch.inference_mode()
    def _decode_modules(self, tokens: Sequence[int]) -> torch.Tensor:
        """`decode` through the model's own modules only (rotary types whose angles are not a fixed table;
        the reference the fast path is tested against)."""
        bsz = len(tokens)
        cache = self.cache
        pos = torch.tensor(cache.lengths[:bsz], dtype=torch.long, device=self.device)
        span = int(pos.max()) + 1
        cache.ensure_capacity(span)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        hidden = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(hidden, pos.unsqueeze(1))
        rows = torch.arange(bsz, device=self.device)
        mask = (torch.arange(span, device=self.device).unsqueeze(0) <= pos.unsqueeze(1)).view(bsz, 1, 1, span)
        for index in range(len(self.layers)):
            residual = hidden
            q, k, v = self._attention_block(index, hidden, cos, sin, None)
            cache.k[index][rows, :, pos] = k[:, :, 0]
            cache.v[index][rows, :, pos] = v[:, :, 0]
            keys = cache.k[index][:bsz, :, :span]
            values = cache.v[index][:bsz, :, :span]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                 enable_gqa=self.kv_heads != self.num_heads)
            hidden = self._layer_tail(index, residual, out, None)
        for slot in range(bsz):
            cache.lengths[slot] += 1
        return self._logits(hidden, None).squeeze(1)

    @torch.inference_mode()
    def execute(self, decision: StepDecision) -> RunnerOutput:
        """Compute one scheduler decision: free, decode, prefill, copy shared prompts, sample."""
        cache = self.cache
        for slot in decision.freed:
            cache.free(slot)
        cache.shrink()
        assert cache.active == len(decision.decode), "the scheduler and the KV cache disagree on slots"
        logits: list[torch.Tensor] = []
        if decision.decode:
            logits.append(self.decode([r.output_ids[-1] for r in decision.decode]))
        prompt_logits: list[torch.Tensor] = []
        echoes: list[list[TokenOut] | None] = []
        if decision.prefill:
            prompts = [r.prompt for r in decision.prefill]
            slots = cache.allocate(len(prompts))
            hidden, proj = self._prefill_hidden(slots, prompts)
            last = torch.tensor([len(p) for p in prompts], device=self.device) - 1
            prompt_logits.extend(self._logits(hidden[torch.arange(len(prompts), device=self.device), last].unsqueeze(1),
                                              proj).squeeze(1))
            for row, request in enumerate(decision.prefill):
                if request.options.echo:
                    rows = self._logits(hidden[row : row + 1, : len(request.prompt)], proj)[0]
                    echoes.append(_prompt_logprobs(request, rows, decision.policy_version))
                else:
                    echoes.append(None)
        if decision.copy:
            slots = cache.allocate(len(decision.copy))
            for slot, (request, donor) in zip(slots, decision.copy, strict=True):
                assert donor.slot is not None
                cache.copy_prefix(donor.slot, slot, len(request.prompt))
                if donor.prompt_logits is not None:
                    prompt_logits.append(donor.prompt_logits)
                else:  # the donor was prefilled in this very step
                    prompt_logits.append(prompt_logits[decision.prefill.index(donor)])
        chunk = decision.chunk
        if chunk is not None:
            prompt = chunk.request.prompt
            hidden, proj = self._prefill_chunk(cache.staging, prompt[chunk.start : chunk.end], chunk.start)
            if chunk.last:  # the prompt is whole: it moves to the next live slot and samples its first token
                slot = cache.allocate(1).start
                cache.copy_prefix(cache.staging, slot, len(prompt))
                cache.lengths[cache.staging] = 0
                prompt_logits.append(self._logits(hidden[:, -1:], proj)[0, 0])
        if prompt_logits:
            logits.append(torch.stack(prompt_logits))
        batch = decision.batch
        if not batch:  # only a middle chunk ran
            return RunnerOutput([], [], [], [], [], echoes)
        opts = [r.options for r in batch]
        result = sample(logits[0] if len(logits) == 1 else torch.cat(logits), [o.temperature for o in opts], [o.top_k for o in opts],
                        [o.top_p for o in opts], [r.generator for r in batch], self.generator)
        top: list[list[tuple[int, float]] | None] = [None] * len(batch)
        for i, o in enumerate(opts):
            if o.top_logprobs > 0:
                values, ids = torch.topk(result.raw[i], o.top_logprobs)
                top[i] = list(zip(ids.tolist(), values.tolist(), strict=True))
        return RunnerOutput(result.tokens.tolist(), result.logprobs.tolist(), result.sampling_logprobs.tolist(),
                            top, prompt_logits, echoes)


def _prompt_logprobs(request: EngineRequest, logits: torch.Tensor, version: str) -> list[TokenOut]:
    """Teacher-forced logprobs of the prompt's own tokens; the first has no context (reported as 0.0)."""
    raw = torch.log_softmax(logits.float(), dim=-1)  # row t predicts token t + 1
    prompt = request.prompt
    ids = torch.tensor(prompt[1:], dtype=torch.long)
    values = raw[torch.arange(len(prompt) - 1), ids].tolist() if len(prompt) > 1 else []
    k = request.options.top_logprobs
    tops: list[list[tuple[int, float]] | None] = [None] * len(prompt)
    if k > 0 and len(prompt) > 1:
        top_v, top_i = torch.topk(raw[:-1], k, dim=-1)
        for t in range(len(prompt) - 1):
            tops[t + 1] = list(zip(top_i[t].tolist(), top_v[t].tolist(), strict=True))
        tops[0] = [(prompt[0], 0.0)]  # no distribution for the first token; clients drop this row
    lps = [0.0, *values]
    return [TokenOut(tok, lp, lp, version, top) for tok, lp, top in zip(prompt, lps, tops, strict=True)]
