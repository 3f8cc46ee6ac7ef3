"""Chunked prefill: a prompt longer than the step budget never stalls running decodes beyond one chunk."""

from __future__ import annotations

import torch

from firetitan.models import load_model
from firetitan.server.deployment.detokenize import IncrementalText
from firetitan.server.deployment.engine.request import EngineRequest, RequestState, SamplingOptions
from firetitan.server.deployment.engine.runner import ModelRunner
from firetitan.server.deployment.engine.scheduler import Scheduler

NANO = "firetitan/nano-qwen3"


class _Ids:
    def decode(self, ids: list[int], **_kw: object) -> str:
        return " ".join(map(str, ids))


def _request(rid: str, prompt: list[int], max_tokens: int) -> EngineRequest:
    req = EngineRequest(rid, prompt, SamplingOptions(max_tokens=max_tokens, ignore_eos=True, seed=1))
    req.text = IncrementalText(_Ids(), ())
    return req


def test_a_long_prompt_is_prefilled_a_chunk_per_step_while_decodes_keep_going() -> None:
    model = load_model(NANO)
    budget = 32
    runner = ModelRunner(model, max_slots=4)
    sched = Scheduler(4, 100_000, budget, max_positions=runner.max_positions)
    gen = torch.Generator().manual_seed(0)
    long_prompt = [1, *torch.randint(3, 4000, (299,), generator=gen).tolist()]
    short = [_request(f"s{i}", [1, 10 + i, 20 + i], 40) for i in range(2)]
    for r in short:
        sched.add(r)
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[float]] = {}
    first_logprob: float | None = None

    def step() -> tuple[int, list[str]]:
        nonlocal first_logprob
        decision = sched.schedule()
        prefill = sum(len(r.prompt) for r in decision.prefill)
        if decision.chunk is not None:
            prefill += decision.chunk.end - decision.chunk.start
        out = runner.execute(decision)
        emitted = sched.update(decision, out)
        for req, o in emitted:
            tokens.setdefault(req.request_id, []).extend(t.token_id for t in o.tokens)
            logprobs.setdefault(req.request_id, []).extend(t.logprob for t in o.tokens)
            if req.request_id == "long" and first_logprob is None:
                first_logprob = o.tokens[0].logprob
        return prefill, [req.request_id for req, _ in emitted]

    step()  # the short ones are prefilled and decoding
    long = _request("long", long_prompt, 4)
    sched.add(long)
    chunk_steps = 0
    while "long" not in tokens:
        prefill, emitted = step()
        chunk_steps += 1
        assert prefill <= budget  # never more prompt work than one chunk in a step ...
        assert {"s0", "s1"} <= set(emitted)  # ... and every running decode still gets its token
    assert chunk_steps == -(-len(long_prompt) // budget)  # ceil(300 / 32) = 10 steps of one chunk each
    assert long.state is RequestState.RUNNING and long.slot == 2
    # The chunked prompt's first token has the logprob of a full forward over the whole prompt.
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([long_prompt])).logits[0, -1].float(), dim=-1)
    assert first_logprob is not None
    assert abs(first_logprob - ref[tokens["long"][0]].item()) < 1e-4
    while sched.num_requests:  # everything runs to the end on consistent slots
        step()
    assert len(tokens["long"]) == 4 and all(len(tokens[r.request_id]) == 40 for r in short)
    # Every token of the chunked request, and of the decodes that ran beside it, equals a full forward.
    for rid, prompt in [("long", long_prompt), *((r.request_id, r.prompt) for r in short)]:
        seq = prompt + tokens[rid]
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), dim=-1)
        want = full[len(prompt) - 1 : -1].gather(1, torch.tensor(tokens[rid]).unsqueeze(1)).squeeze(1)
        assert torch.allclose(torch.tensor(logprobs[rid]), want, atol=1e-4), rid


def test_kv_memory_stays_under_its_bound_and_shrinks_after_a_long_request() -> None:
    model = load_model(NANO)
    slots, per_row = 6, 512
    runner = ModelRunner(model, max_slots=slots, max_kv_tokens=(slots + 1) * per_row)
    cache = runner.cache
    bound = (slots + 1) * per_row * cache.bytes_per_position  # the stated bound: max_kv_tokens positions
    assert cache.bound_bytes == bound and runner.max_positions == per_row
    sched = Scheduler(slots, 100_000, 64, max_positions=runner.max_positions)
    gen = torch.Generator().manual_seed(1)
    shorts = [_request(f"s{i}", [1, 30 + i, 40 + i, 50 + i], 60) for i in range(5)]
    long = _request("long", [1, *torch.randint(3, 4000, (309,), generator=gen).tolist()], 10)
    for r in [*shorts, long]:
        sched.add(r)
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[float]] = {}
    capacities = []
    while sched.num_requests:
        decision = sched.schedule()
        out = runner.execute(decision)
        for req, o in sched.update(decision, out):
            tokens.setdefault(req.request_id, []).extend(t.token_id for t in o.tokens)
            logprobs.setdefault(req.request_id, []).extend(t.logprob for t in o.tokens)
        assert cache.allocated_bytes <= bound
        capacities.append(cache.capacity)
    assert max(capacities) == per_row  # the long request needed the rows to grow to the bound ...
    long_done = capacities.index(per_row) + 10
    assert capacities[-1] <= per_row // 2 and min(capacities[long_done:]) < per_row  # ... and they shrank back
    for r in shorts:  # the shorts decoded across the grow and the shrink; their logprobs are intact
        seq = r.prompt + tokens[r.request_id]
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), dim=-1)
        want = full[len(r.prompt) - 1 : -1].gather(1, torch.tensor(tokens[r.request_id]).unsqueeze(1)).squeeze(1)
        assert torch.allclose(torch.tensor(logprobs[r.request_id]), want, atol=1e-4), r.request_id
