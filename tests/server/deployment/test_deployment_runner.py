"""The model runner's batched prefill/decode over the slot KV cache equals a full transformers forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from firetitan.models import load_model
from firetitan.server.deployment.engine.native import row_blocked_kernel
from firetitan.server.deployment.engine.ops import (
    BatchPackedWeights,
    RowBlockedWeights,
    grouped_decode_attention,
    mkl_packing_works,
)
from firetitan.server.deployment.engine.path_choice import (
    MODULES,
    PACKED,
    PREPARED,
    ROW_BLOCKED,
    DecodePathChooser,
)
from firetitan.server.deployment.engine.runner import (
    PREFILL_ROWS_SHARING_A_KEY,
    DecodeOptions,
    ModelRunner,
)

NANO = "firetitan/nano-qwen3"


def _full_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_continuous_batch_matches_full_forward_with_joins_and_leaves() -> None:
    model = load_model(NANO)
    runner = ModelRunner(model, max_slots=4)
    gen = torch.Generator().manual_seed(0)
    seqs = [[1, 5, 6, 7, 8], [1, 300], [1, *range(40, 60)]]
    logs: list[list[torch.Tensor]] = [[row] for row in runner.prefill(runner.cache.allocate(3), seqs)]
    for step in range(12):
        toks = [int(torch.randint(3, 4096, (1,), generator=gen)) for _ in seqs]
        for seq, tok in zip(seqs, toks, strict=True):
            seq.append(tok)
        for log, row in zip(logs, runner.decode(toks), strict=True):
            log.append(row)
        if step == 4:  # the first sequence leaves; the last moves into its slot; a new one joins
            assert runner.cache.free(0) == 2
            done_seq, done_log = seqs[0], logs[0]
            seqs, logs = [seqs[2], seqs[1]], [logs[2], logs[1]]
            new = [1, 77, 78]
            logs.append([runner.prefill(runner.cache.allocate(1), [new])[0]])
            seqs.append(new)
    for seq, log in [*zip(seqs, logs, strict=True), (done_seq, done_log)]:
        ref = _full_logprobs(model, seq)[len(seq) - len(log):]
        got = torch.log_softmax(torch.stack(log), dim=-1)
        assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    assert runner.cache.used_tokens == sum(len(s) for s in seqs)  # every fed position is cached once


def test_a_kept_cache_serves_new_sequences_as_a_fresh_one() -> None:
    """After an idle reset that keeps the storage, new (shorter) sequences in the same slots decode to the
    full forward's logits: the previous sequences' keys and values past their lengths are masked."""
    model = load_model(NANO)
    runner = ModelRunner(model, max_slots=3)
    runner.prefill(runner.cache.allocate(3), [[1, *range(100, 140)], [1, *range(200, 230)], [1, 9]])
    for step in range(5):
        runner.decode([7 + step, 8 + step, 9 + step])
    storage = runner.cache.k[0]
    runner.cache.reset(keep_storage=True)
    assert runner.cache.k[0] is storage and runner.cache.active == 0
    seqs = [[1, 5, 6], [1, 300, 301, 302, 303], [1, 44]]
    logs = [[row] for row in runner.prefill(runner.cache.allocate(3), seqs)]
    for step in range(6):
        toks = [3 + step, 500 + step, 900 + step]
        for seq, tok, log, row in zip(seqs, toks, logs, runner.decode(toks), strict=True):
            seq.append(tok)
            log.append(row)
    for seq, log in zip(seqs, logs, strict=True):
        ref = _full_logprobs(model, seq)[len(seq) - len(log):]
        got = torch.log_softmax(torch.stack(log), dim=-1)
        assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    runner.cache.reset()  # a hard reset (after a failed step) drops the storage
    assert runner.cache.k == [] and runner.cache.allocated_bytes == 0


def _decode_paths(runner: ModelRunner, prompts: list[list[int]], steps: int, paths: tuple[str, ...]
                  ) -> list[torch.Tensor]:
    """Logits of `steps` decode steps through each of `paths` from the same KV state (the cache is reset
    and refilled between them): "prepared" and "modules" are the two projection paths of the fast step
    (rotary table; "calls" is the modules path by calling the modules, as for models without prepared
    weights; "packed" runs weights MKL packed for this batch size, "row_blocked" the native matmul's
    weights), "reference" the step through the model's modules only."""
    runs = []
    packed = BatchPackedWeights.for_rows(runner.model, runner.layers, len(prompts)) if "packed" in paths else None
    for path in paths:
        if packed is not None:
            packed.refresh()  # as `BatchPacks.get` does: after a weight swap, pack the new weights
        runner.cache.reset()
        runner.prefill(runner.cache.allocate(len(prompts)), prompts)
        toks, rows = [3] * len(prompts), []
        for _ in range(steps):
            with torch.inference_mode():
                if path == "reference":
                    logits = runner._decode_modules(toks)
                else:
                    proj = {"prepared": runner._projections, "modules": lambda: runner.module_proj,
                            "calls": lambda: None, "packed": lambda: packed,
                            "row_blocked": lambda: runner.row_blocked}[path]()
                    if path == "row_blocked":
                        proj.refresh()  # as `decode` does before using them
                    logits = runner._decode_fast(toks, proj)
            rows.append(logits)
            toks = logits.argmax(-1).tolist()
        runs.append(torch.stack(rows))
    return runs


def test_fast_decode_equals_the_module_path_and_follows_a_weight_swap() -> None:
    """Both projection paths of the fast decode step (fused, oneDNN-prepacked weights; the modules' own) give
    the reference step's logits, also after new weights are copied into the modules (as a hot-load does):
    the prepared weights are rebuilt."""
    model = load_model(NANO)
    runner = ModelRunner(model, max_slots=4)
    assert runner.rope is not None and runner.proj is not None and runner.proj.packed
    prompts = [[1, 5, 6, 7], [1, 300, 301], [1, *range(40, 50)]]
    paths = ("prepared", "modules", "calls", "reference")
    prepared, modules, calls, reference = _decode_paths(runner, prompts, 6, paths)
    for got in (prepared, modules, calls):
        assert torch.allclose(got, reference, atol=1e-5), (got - reference).abs().max()
    gen = torch.Generator().manual_seed(1)
    new = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.load_state_dict(new)
    swapped, swapped_modules, swapped_calls, reference_after = _decode_paths(runner, prompts, 6, paths)
    assert not torch.allclose(swapped, prepared, atol=1e-3)  # the new weights changed the logits
    for got in (swapped, swapped_modules, swapped_calls):
        assert torch.allclose(got, reference_after, atol=1e-5), (got - reference_after).abs().max()


def test_decode_times_both_paths_then_keeps_the_faster_per_batch_size(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`decode` alternates the two paths for a batch-size bucket's first steps, then uses the one whose
    fastest step was faster (here made unmistakable: the prepared path is slowed down)."""
    from firetitan.server.deployment.engine import runner as runner_module

    runner = ModelRunner(load_model(NANO), max_slots=4, options=DecodeOptions(batch_packs=0, native_matmul=False))
    used: list[str] = []
    fast = runner._decode_fast
    clock = [0.0]

    def timed(tokens, proj):  # type: ignore[no-untyped-def]
        prepared = proj is runner.proj
        used.append("prepared" if prepared else "modules")
        clock[0] += 0.050 if prepared else 0.010  # what perf_counter will see this step take
        return fast(tokens, proj)

    monkeypatch.setattr(runner, "_decode_fast", timed)
    monkeypatch.setattr(runner_module, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    runner.prefill(runner.cache.allocate(2), [[1, 5, 6], [1, 7]])
    for _ in range(8):
        runner.decode([3, 4])
    trials = runner.decode_paths.trials
    assert used[: 2 * trials] == ["prepared", "modules"] * trials
    assert used[2 * trials:] == ["modules"] * (8 - 2 * trials)
    assert runner.decode_paths.chosen == {DecodePathChooser.bucket(2): "modules"}
    runner.cache.reset()
    runner.prefill(runner.cache.allocate(1), [[1, 9]])
    runner.decode([3])
    assert used[-1] == "prepared"  # batch 1 is another bucket: its own trials start over


def test_grouped_decode_attention_is_sdpa_with_grouped_heads() -> None:
    gen = torch.Generator().manual_seed(2)
    bsz, heads, kv, span, dim = 5, 6, 2, 11, 16
    q = torch.randn(bsz, heads, 1, dim, generator=gen)
    keys, values = torch.randn(bsz, kv, span, dim, generator=gen), torch.randn(bsz, kv, span, dim, generator=gen)
    lengths = torch.tensor([11, 3, 7, 1, 9])  # ragged: each row attends to its own prefix only
    mask = (torch.arange(span).unsqueeze(0) < lengths.unsqueeze(1)).view(bsz, 1, 1, span)
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    got = grouped_decode_attention(q, keys, values, bias)
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    # bfloat16 inputs: computed in float32, so off the float32 result by the output's rounding only.
    half = grouped_decode_attention(q.bfloat16(), keys.bfloat16(), values.bfloat16(), bias)
    assert half.dtype == torch.bfloat16
    exact = F.scaled_dot_product_attention(q.bfloat16().float(), keys.bfloat16().float(), values.bfloat16().float(),
                                           attn_mask=mask, enable_gqa=True)
    assert torch.allclose(half.float(), exact, atol=exact.abs().max().item() * 2**-8), (half.float() - exact).abs().max()


def test_bf16_decode_follows_the_bf16_full_forward() -> None:
    """The bfloat16 decode step (grouped float32 attention) gives the logits of the model's own bfloat16
    forward, within bfloat16 rounding (the bound of test_bf16_end_to_end.py's derivation)."""
    model = load_model(NANO).to(torch.bfloat16)
    runner = ModelRunner(model, max_slots=4)
    seqs = [[1, 5, 6, 7, 8], [1, 300], [1, *range(40, 60)]]
    logs = [[row] for row in runner.prefill(runner.cache.allocate(3), seqs)]
    for step in range(8):
        toks = [3 + step, 500 + step, 900 + step]
        for seq, tok in zip(seqs, toks, strict=True):
            seq.append(tok)
        for log, row in zip(logs, runner.decode(toks), strict=True):
            log.append(row)
    for seq, log in zip(seqs, logs, strict=True):
        ref = _full_logprobs(model, seq)[len(seq) - len(log):]
        got = torch.log_softmax(torch.stack(log).float(), dim=-1)
        assert torch.allclose(got, ref, atol=0.02), (got - ref).abs().max()


needs_mkl = pytest.mark.skipif(not mkl_packing_works(torch.float32, torch.device("cpu")),
                               reason="this torch build has no MKL packed GEMM")


@needs_mkl
def test_packed_decode_equals_the_reference_and_follows_a_weight_swap() -> None:
    """Weights MKL packed for the batch size give the reference step's logits, also after a hot-load-like
    write into the modules (the pack is rebuilt), and refuse a batch of another size."""
    model = load_model(NANO)
    runner = ModelRunner(model, max_slots=4)
    _matches_the_reference_before_and_after_a_swap(runner, [[1, 5, 6, 7], [1, 300, 301], [1, *range(40, 50)]],
                                                   "packed")
    pack = BatchPackedWeights.for_rows(model, runner.layers, 3)
    with pytest.raises(ValueError, match="packed for 3 rows were given 2"):
        pack.lm_head(torch.zeros(2, 1, model.config.hidden_size))


def _clocked_decode(runner: ModelRunner, monkeypatch, cost: dict[str, float]) -> list[str]:  # type: ignore[no-untyped-def]
    """Make each path's decode step take `cost[path]` seconds on the clock `decode` reads; returns the log
    of paths used."""
    from firetitan.server.deployment.engine import runner as runner_module

    used: list[str] = []
    fast = runner._decode_fast
    clock = [0.0]

    def timed(tokens, proj):  # type: ignore[no-untyped-def]
        path = (PREPARED if proj is runner.proj else MODULES if proj is runner.module_proj
                else PACKED if isinstance(proj, BatchPackedWeights)
                else ROW_BLOCKED if isinstance(proj, RowBlockedWeights) else "?")
        used.append(path)
        clock[0] += cost[path]
        return fast(tokens, proj)

    monkeypatch.setattr(runner, "_decode_fast", timed)
    monkeypatch.setattr(runner_module, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    return used


@needs_mkl
def test_a_settled_batch_size_gets_packed_weights_kept_only_when_faster(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Once a batch size has run `settle` steps in a row it is packed and timed against its bucket's
    winner; the pack stays when it wins. A size whose pack loses frees it and is never packed again."""
    runner = ModelRunner(load_model(NANO), max_slots=4, options=DecodeOptions(native_matmul=False))
    assert runner.packs is not None
    settle, trials = runner.packs.settle, runner.decode_paths.trials
    used = _clocked_decode(runner, monkeypatch, {PREPARED: 0.05, MODULES: 0.03, PACKED: 0.02})
    runner.prefill(runner.cache.allocate(2), [[1, 5, 6], [1, 7]])
    for _ in range(settle - 1):
        runner.decode([3, 4])
    assert PACKED not in used and runner.packs.built == 0  # not settled yet
    for _ in range(2 * trials + 2):
        runner.decode([3, 4])
    assert runner.packs.built == 1
    # Against the bucket's winner, which goes first: a step through it evicts the just-written pack.
    assert used[settle - 1: settle - 1 + 2 * trials] == [MODULES, PACKED] * trials
    assert used[-2:] == [PACKED, PACKED]
    assert runner.decode_paths.chosen[DecodePathChooser.exact(2)] == PACKED

    slow = ModelRunner(load_model(NANO), max_slots=4, options=DecodeOptions(native_matmul=False))
    assert slow.packs is not None
    used = _clocked_decode(slow, monkeypatch, {PREPARED: 0.05, MODULES: 0.03, PACKED: 0.04})
    slow.prefill(slow.cache.allocate(2), [[1, 5, 6], [1, 7]])
    for _ in range(settle + 4 * trials):
        slow.decode([3, 4])
    assert slow.decode_paths.chosen[DecodePathChooser.exact(2)] == MODULES
    assert slow.packs.packs == {} and slow.packs.declined == {2} and slow.packs.built == 1
    assert used[-trials:] == [MODULES] * trials



def _matches_the_reference_before_and_after_a_swap(runner: ModelRunner, prompts: list[list[int]], path: str) -> None:
    """`path`'s decode logits equal the reference step's (1e-5), also after a hot-load-like write of new
    weights into the modules, which must change them (the path's weights are rebuilt)."""
    got, reference = _decode_paths(runner, prompts, 6, (path, "reference"))
    assert torch.allclose(got, reference, atol=1e-5), (got - reference).abs().max()
    gen = torch.Generator().manual_seed(1)
    model = runner.model
    with torch.no_grad():
        model.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()})
    swapped, reference_after = _decode_paths(runner, prompts, 6, (path, "reference"))
    assert not torch.allclose(swapped, got, atol=1e-3)
    assert torch.allclose(swapped, reference_after, atol=1e-5), (swapped - reference_after).abs().max()


def test_row_blocked_decode_equals_the_reference_and_follows_a_weight_swap() -> None:
    """The native matmul's weights give the reference step's logits at batch 1, 3 and 11 (a whole and a
    partial tile of 8 rows), also after a hot-load-like write into the modules (they are rebuilt)."""
    runner = ModelRunner(load_model(NANO), max_slots=12)
    assert (runner.row_blocked is not None) == (row_blocked_kernel() is not None)
    assert runner.row_blocked is not None, "gcc builds the kernel on every machine this suite runs on"
    three = [[1, 5, 6, 7], [1, 300, 301], [1, *range(40, 50)]]
    eleven = [[1, 7 * i + 2, 9 * i + 5][: 2 + i % 2] for i in range(11)]
    for prompts in ([[1, 5, 6, 7]], three, eleven):
        _matches_the_reference_before_and_after_a_swap(runner, prompts, "row_blocked")


def test_row_blocked_weights_are_offered_at_every_batch_size(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every batch-size bucket times the native matmul's weights beside the two other paths and keeps the
    fastest, small batches and large alike; where another path wins, that bucket keeps it."""
    runner = ModelRunner(load_model(NANO), max_slots=9, options=DecodeOptions(batch_packs=0))
    assert runner.row_blocked is not None
    trials = runner.decode_paths.trials
    used = _clocked_decode(runner, monkeypatch, {PREPARED: 0.05, MODULES: 0.03, ROW_BLOCKED: 0.02})
    for batch in (2, 9):  # the buckets 2-3 and 8-15
        runner.cache.reset()
        runner.prefill(runner.cache.allocate(batch), [[1, 2 + i] for i in range(batch)])
        used.clear()
        for _ in range(3 * trials + 2):
            runner.decode([3] * batch)
        assert used[: 3 * trials] == [PREPARED, MODULES, ROW_BLOCKED] * trials
        assert used[3 * trials:] == [ROW_BLOCKED] * 2
        assert runner.decode_paths.chosen[DecodePathChooser.bucket(batch)] == ROW_BLOCKED

    slow = ModelRunner(load_model(NANO), max_slots=4, options=DecodeOptions(batch_packs=0))
    used = _clocked_decode(slow, monkeypatch, {PREPARED: 0.05, MODULES: 0.03, ROW_BLOCKED: 0.04})
    slow.prefill(slow.cache.allocate(4), [[1, 2 + i] for i in range(4)])
    for _ in range(3 * trials + 1):
        slow.decode([3] * 4)
    assert slow.decode_paths.chosen[DecodePathChooser.bucket(4)] == MODULES
    assert used[-1] == MODULES


def _clocked_prefill(runner: ModelRunner, monkeypatch, cost: dict[str, float]) -> list[str]:  # type: ignore[no-untyped-def]
    """Make each prefill take `cost[path]` seconds on the clock the runner reads (each reading advances it
    by the cost of the path last chosen); returns the log of the prefills' paths."""
    from firetitan.server.deployment.engine import runner as runner_module

    used: list[str] = []
    choose = runner._prefill_projections
    clock = [0.0]

    def chosen(rows: int):  # type: ignore[no-untyped-def]
        key, path, proj = choose(rows)
        used.append(path)
        return key, path, proj

    def perf_counter() -> float:
        clock[0] += cost[used[-1]] if used else 0.0
        return clock[0]

    monkeypatch.setattr(runner, "_prefill_projections", chosen)
    monkeypatch.setattr(runner_module, "time", type("Clock", (), {"perf_counter": staticmethod(perf_counter)}))
    return used


def test_prefill_times_both_weights_then_keeps_the_faster_and_both_give_the_model_logits(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A prefill's token rows pick their bucket's weights as decode's batch sizes do: the prepared and the
    row-blocked weights alternate for `trials` prefills each, then the faster per row stays; a prefill of
    another size starts its own trials. Both give the model's own last-position logits (1e-5)."""
    model = load_model(NANO)
    runner = ModelRunner(model, max_slots=4, options=DecodeOptions(batch_packs=0))
    assert runner.row_blocked is not None
    used = _clocked_prefill(runner, monkeypatch, {PREPARED: 0.05, ROW_BLOCKED: 0.02})
    prompts = [[1, 5, 6, 7], [1, 300, 301]]  # 7 token rows (the glue runs them unpadded)
    assert runner.glue is not None, "gcc builds the glue on every machine this suite runs on"
    with torch.no_grad():
        reference = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts])
    trials = runner.prefill_paths.trials
    for _ in range(2 * trials + 1):
        runner.cache.reset()
        got = runner.prefill(runner.cache.allocate(2), prompts)
        assert torch.allclose(got, reference, atol=1e-5), (used[-1], (got - reference).abs().max())
    assert used == [PREPARED, ROW_BLOCKED] * trials + [ROW_BLOCKED]
    assert runner.prefill_paths.chosen == {DecodePathChooser.bucket(7): ROW_BLOCKED}
    runner.cache.reset()
    runner.prefill(runner.cache.allocate(3), [[1, *range(40, 50)]] * 3)  # 33 rows: another bucket
    assert used[-1] == PREPARED
    # From PREFILL_ROWS_SHARING_A_KEY rows up, every size shares one key: 160 and then 300 rows alternate.
    for count, length in ((4, 40), (3, 100)):
        runner.cache.reset()
        runner.prefill(runner.cache.allocate(count), [[1, *range(2, length + 1)]] * count)
    assert used[-2:] == [PREPARED, ROW_BLOCKED]
    assert PREFILL_ROWS_SHARING_A_KEY <= 160
