"""Sampling math, detokenization/stop strings and scheduler admission, tested directly."""

from __future__ import annotations

import math

import pytest
import torch

from firetitan.server.deployment.detokenize import IncrementalText
from firetitan.server.deployment.engine.request import EngineRequest, RequestState, SamplingOptions
from firetitan.server.deployment.engine.sampler import inverse_cdf, sample, sampling_log_probs
from firetitan.server.deployment.engine.scheduler import Scheduler


def _lp(logits: list[float], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    return sampling_log_probs(torch.tensor([logits]), torch.tensor([temperature]), torch.tensor([top_k]),
                              torch.tensor([top_p]))[0]


def test_temperature_only_is_tempered_softmax() -> None:
    logits = [2.0, 1.0, 0.0, -1.0]
    got = _lp(logits, temperature=0.5)
    want = torch.log_softmax(torch.tensor(logits) / 0.5, dim=-1)
    assert torch.allclose(got, want, atol=1e-6)


def test_top_k_keeps_k_most_likely_and_renormalises() -> None:
    got = _lp([3.0, 1.0, 2.0, 0.0], top_k=2)
    z = math.log(math.exp(3.0) + math.exp(2.0))
    assert got[0].item() == pytest.approx(3.0 - z, abs=1e-6)
    assert got[2].item() == pytest.approx(2.0 - z, abs=1e-6)
    assert torch.isinf(got[1]) and torch.isinf(got[3])


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    got = _lp(probs.log().tolist(), top_p=0.75)  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75 → keep two
    assert got[0].exp().item() == pytest.approx(0.5 / 0.8, abs=1e-6)
    assert got[1].exp().item() == pytest.approx(0.3 / 0.8, abs=1e-6)
    assert torch.isinf(got[2]) and torch.isinf(got[3])
    # p = 0.5 exactly reached by the first token: only it survives.
    assert _lp(probs.log().tolist(), top_p=0.5)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_sample_reports_raw_and_sampling_logprobs_of_the_drawn_token() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    res = sample(logits, [1.0, 0.7, 0.0], [0, 5, 0], [1.0, 0.9, 1.0], [None, None, None], torch.Generator().manual_seed(1))
    raw = torch.log_softmax(logits, dim=-1)
    for row in range(3):
        assert res.logprobs[row].item() == pytest.approx(raw[row, res.tokens[row]].item(), abs=1e-6)
    assert res.sampling_logprobs[0].item() == pytest.approx(res.logprobs[0].item(), abs=1e-6)
    q = sampling_log_probs(logits[1:2], torch.tensor([0.7]), torch.tensor([5]), torch.tensor([0.9]))[0]
    assert res.sampling_logprobs[1].item() == pytest.approx(q[res.tokens[1]].item(), abs=1e-6)
    assert torch.isfinite(q[res.tokens[1]])  # never draws a filtered-out token
    assert res.tokens[2].item() == int(torch.argmax(logits[2]))  # temperature 0 is greedy
    assert res.sampling_logprobs[2].item() == 0.0


def test_seeded_rows_are_reproducible_whatever_shares_the_batch() -> None:
    logits = torch.randn(4, 100)
    a = sample(logits, [1.0] * 4, [0] * 4, [1.0] * 4, [torch.Generator().manual_seed(7), None, None, None])
    b = sample(logits[[0, 3]], [1.0] * 2, [0] * 2, [1.0] * 2, [torch.Generator().manual_seed(7), None])
    assert a.tokens[0].item() == b.tokens[0].item()


def test_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(4000, 2)
    res = sample(logits, [1.0] * 4000, [0] * 4000, [1.0] * 4000, [None] * 4000, torch.Generator().manual_seed(0))
    assert res.tokens.float().mean().item() == pytest.approx(0.75, abs=0.03)


class _CharTokenizer:
    """Token id = character code; enough to exercise incremental text without a real tokenizer."""

    def decode(self, ids: list[int], **_kw: object) -> str:
        return "".join(chr(i) for i in ids)


def test_stop_string_cuts_text_and_holds_back_possible_prefixes() -> None:
    text = IncrementalText(_CharTokenizer(), ("END",))
    ids: list[int] = []
    deltas = []
    for ch in "abcEN":
        ids.append(ord(ch))
        deltas.append(text.update(ids))
    assert "".join(deltas) == "abc"  # "EN" may still become "END"
    ids.append(ord("D"))
    assert text.update(ids) == ""
    assert text.stopped and text.emitted == "abc"


def test_text_without_stop_is_released_at_the_end() -> None:
    text = IncrementalText(_CharTokenizer(), ("xyz",))
    ids = [ord(c) for c in "hello x"]
    first = text.update(ids)
    assert first == "hello "
    assert text.update(ids, final=True) == "x"


def _req(rid: str, prompt_len: int, max_tokens: int) -> EngineRequest:
    return EngineRequest(rid, list(range(prompt_len)), SamplingOptions(max_tokens=max_tokens))


def test_scheduler_admits_under_both_limits_in_fifo_order() -> None:
    sched = Scheduler(max_running_seqs=2, max_cached_tokens=100)
    reqs = [_req("a", 10, 20), _req("b", 10, 61), _req("c", 5, 5)]
    for r in reqs:
        sched.add(r)
    first = sched.schedule()
    assert [r.request_id for r in first.admitted] == ["a"]  # b would need 30 + 71 > 100
    assert sched.schedule().admitted == []  # FIFO: c waits behind b
    sched.finish(reqs[0], RequestState.FINISHED, "stop")
    second = sched.schedule()
    assert [r.request_id for r in second.admitted] == ["b", "c"]
    assert sched.reserved_tokens == 81 and reqs[0].state is RequestState.FINISHED
    sched.admitting = False
    sched.add(_req("d", 1, 1))
    assert sched.schedule().admitted == []


def test_request_state_machine_rejects_illegal_transitions() -> None:
    req = _req("x", 3, 3)
    req.advance(RequestState.RUNNING)
    req.advance(RequestState.FINISHED)
    with pytest.raises(RuntimeError):
        req.advance(RequestState.RUNNING)


def test_scheduler_never_admits_past_the_slot_limit_within_one_step() -> None:
    sched = Scheduler(max_running_seqs=2, max_cached_tokens=10_000)
    for i in range(5):
        sched.add(_req(f"r{i}", 3, 4))  # identical prompts: the followers would be copies
    decision = sched.schedule()
    assert len(decision.admitted) == 2 and len(sched.running) == 2
    assert [r.slot for r in sched.running] == [0, 1]


def test_running_order_matches_slots_after_finishes() -> None:
    sched = Scheduler(max_running_seqs=4, max_cached_tokens=10_000)
    reqs = [_req(f"r{i}", 2 + i, 4) for i in range(4)]
    for r in reqs:
        sched.add(r)
    sched.schedule()
    sched.finish(reqs[0], RequestState.FINISHED, "stop")
    sched.finish(reqs[3], RequestState.FINISHED, "stop")
    decision = sched.schedule()
    assert decision.freed == [0, 0]  # the KV cache replays the same moves: r3 into 0, then r2 into 0
    assert [r.request_id for r in sched.running] == ["r2", "r1"]
    assert all(r.slot == i for i, r in enumerate(sched.running))


def test_windowed_filter_equals_the_full_sort() -> None:
    """Rows decided among their most likely tokens (and those that fall back to sorting) get exactly the
    filter of sorting the whole row: same kept tokens, same log-probabilities."""
    from firetitan.server.deployment.engine.sampler import _sorted_filter

    gen = torch.Generator().manual_seed(0)
    rows, vocab = 96, 4096
    scale = torch.tensor([0.5, 3.0, 8.0]).repeat(rows // 3).unsqueeze(1)  # flat to peaked rows
    logits = torch.randn(rows, vocab, generator=gen) * scale
    temperature = torch.tensor([1.0, 0.7, 1.3, 0.0]).repeat(rows // 4)
    top_k = torch.tensor([0, 0, 5, 40, 0, 17]).repeat(rows // 6)
    top_p = torch.tensor([0.9, 0.5, 1.0, 0.95, 0.99, 0.8, 1.0, 0.3]).repeat(rows // 8)
    got = sampling_log_probs(logits, temperature, top_k, top_p)
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    want = _sorted_filter(logits / temp.unsqueeze(1), k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    kept = torch.isfinite(want)
    assert torch.allclose(got[kept], want[kept], atol=1e-5)
    counts = kept.sum(dim=-1)
    assert int(counts.min()) >= 1 and int(counts.max()) > 64  # both paths ran: some nuclei pass the window,
    nucleus_only = (top_p < 1.0) & (top_k == 0)
    assert int(counts[nucleus_only].min()) < 64  # others close inside it


def test_inverse_cdf_lands_where_an_exact_cumulative_sum_does() -> None:
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(64, 1000, generator=gen) * 2, dim=-1)  # 1000: the last block is padded
    probs[:8, 64:640] = 0.0  # whole blocks and block edges without mass
    probs = probs / probs.sum(dim=-1, keepdim=True)
    for u in (0.0, 0.25, 0.5, 0.999, float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))):
        uniform = torch.full((64,), u)
        tokens = inverse_cdf(probs, uniform)
        exact = probs.double().cumsum(dim=-1)
        target = uniform.double() * exact[:, -1]
        for row, token in enumerate(tokens.tolist()):
            assert probs[row, token] > 0, (u, row)
            below = exact[row, token - 1].item() if token else 0.0
            assert below - 1e-5 <= target[row].item() <= exact[row, token].item() + 1e-5, (u, row)


def test_inverse_cdf_never_draws_a_token_without_mass() -> None:
    probs = torch.zeros(4, 256)
    probs[0, 63] = 1.0  # the last token of the first block
    probs[1, 64] = 1.0  # the first of the second
    probs[2, [0, 255]] = 0.5
    probs[3, 127:129] = torch.tensor([1e-30, 1.0])  # a mass that rounds away next to the real one
    just_below_one = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))
    for u in [*torch.linspace(0, 1, 101)[:-1].tolist(), just_below_one]:
        tokens = inverse_cdf(probs, torch.full((4,), u))
        assert all(probs[row, token] > 0 for row, token in enumerate(tokens.tolist())), u


def test_a_block_edge_rounding_is_drawn_again_by_the_exact_scan() -> None:
    # One large mass then tiny ones: a running sum rounds every tiny one away, a vectorised block sum
    # keeps them, so the block's sum passes its own running sum. A target between the two is inside the
    # block by its sum but past all of its running sum, which would land on the zero-mass last token.
    row = torch.zeros(128)
    row[0], row[1:63], row[64] = 0.5, 5e-9, 0.5
    block_sum, running = row[:64].sum().item(), row[:64].cumsum(dim=0)[-1].item()
    assert block_sum > running  # the premise: the two roundings differ here
    u = (running + block_sum) / 2 / (block_sum + 0.5)
    token = inverse_cdf(row.unsqueeze(0), torch.tensor([u])).item()
    assert row[token] > 0


def test_non_finite_logits_fail_the_draw_instead_of_drawing() -> None:
    logits = torch.randn(3, 100)
    logits[1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\] have non-finite"):
        sample(logits, [1.0] * 3, [0] * 3, [1.0] * 3, [None] * 3, torch.Generator().manual_seed(0))
