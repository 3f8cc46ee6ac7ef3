"""The model runner's batched prefill/decode over the slot KV cache equals a full transformers forward."""

from __future__ import annotations

import torch

from firetitan.models import load_model
from firetitan.server.deployment.engine.runner import ModelRunner

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
