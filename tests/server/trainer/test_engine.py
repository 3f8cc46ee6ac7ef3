"""TrainerEngine in-process: AdamW steps with exactly the given hyperparameters, clipping, padding."""

from __future__ import annotations

import pytest
import torch

from firetitan.models import load_model
from firetitan.server.trainer.batch import gather_logprobs, prepare_batch
from firetitan.server.trainer.engine import ModelSpec, TrainerEngine
from firetitan.types import AdamParams, Datum, ModelInput, TensorData

NANO = "firetitan/nano-qwen3"


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def data() -> list[Datum]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for n in (7, 4):
        seq = torch.randint(3, 4096, (n + 1,), generator=gen)
        out.append(Datum(model_input=ModelInput.from_ints(seq[:-1].tolist()),
                         loss_fn_inputs={"target_tokens": TensorData.from_torch(seq[1:]),
                                         "weights": TensorData.from_torch(torch.rand(n, generator=gen))}))
    return out


def reference_loss(model: torch.nn.Module, ds: list[Datum]) -> torch.Tensor:
    # The same padded batch as the engine, so only the optimizer step is under test here.
    batch = prepare_batch(ds, "cross_entropy", None, 4096)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    lps = gather_logprobs(logits, batch)
    return -sum((lp * d.loss_fn_inputs["weights"].to_torch()).sum() for lp, d in zip(lps, ds, strict=True))


def test_optim_steps_match_plain_torch_adamw_with_per_step_hyperparameters_and_clipping() -> None:
    engine = TrainerEngine("e", ModelSpec(NANO), store=None, states=None)
    ref = load_model(NANO)
    opt = torch.optim.AdamW(ref.parameters())
    # eps=1.0 makes the update depend on the gradient's scale, so clipping shows in the weights.
    steps = [AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.99, eps=1.0, weight_decay=0.1, grad_clip_norm=0.5),
             AdamParams(learning_rate=3e-3, beta1=0.5, beta2=0.9, eps=1e-8, weight_decay=0.0)]
    ds = data()
    for params in steps:
        batch = prepare_batch(ds, "cross_entropy", None, engine.vocab_size, engine.pad_id)
        engine.forward(batch, backward=True)
        metrics = engine.optim_step(params)["metrics"]

        loss = reference_loss(ref, ds)
        loss.backward()
        for g in opt.param_groups:
            g.update(lr=params.learning_rate, betas=(params.beta1, params.beta2), eps=params.eps,
                     weight_decay=params.weight_decay)
        # The engine's norm is accumulated in float64 (the same however the gradients are sharded);
        # torch's float32 total norm differs from it by ~1e-5 relative on this model.
        grads = [p.grad for p in ref.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([g.double() for g in grads])
        if params.grad_clip_norm:
            torch.nn.utils.clip_grads_with_norm_(ref.parameters(), params.grad_clip_norm, norm)
        opt.step()
        opt.zero_grad()
        assert metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    assert metrics["step"] == 2.0
    got = engine.model.state_dict()
    worst = max(float((got[k] - v).abs().max()) for k, v in ref.state_dict().items())
    assert worst <= 1e-6


def test_forward_does_not_touch_gradients_and_padding_does_not_change_logprobs() -> None:
    engine = TrainerEngine("e", ModelSpec(NANO), store=None, states=None)
    ds = data()
    both = prepare_batch(ds, "cross_entropy", None, engine.vocab_size, engine.pad_id)
    assert both.attention_mask is not None  # uneven lengths are padded
    out = engine.forward(both, backward=False)
    assert all(p.grad is None for p in engine.model.parameters())
    for d, o in zip(ds, out["loss_fn_outputs"], strict=True):
        alone = engine.forward(prepare_batch([d], "cross_entropy", None, engine.vocab_size), backward=False)
        a = TensorData.model_validate(o["logprobs"]).to_torch()
        b = TensorData.model_validate(alone["loss_fn_outputs"][0]["logprobs"]).to_torch()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_two_dimensional_targets_give_two_dimensional_logprobs() -> None:
    engine = TrainerEngine("e", ModelSpec(NANO), store=None, states=None)
    ids = [5, 6, 7]
    topk = torch.tensor([[6, 10], [7, 11], [8, 12]])
    d = Datum(model_input=ModelInput.from_ints(ids),
              loss_fn_inputs={"target_tokens": TensorData.from_torch(topk),
                              "weights": TensorData.from_torch(torch.tensor([[0.7, 0.3]] * 3))})
    out = engine.forward(prepare_batch([d], "cross_entropy", None, engine.vocab_size), backward=False)
    lp = TensorData.model_validate(out["loss_fn_outputs"][0]["logprobs"]).to_torch()
    assert lp.shape == (3, 2)
    first = TensorData.model_validate(engine.forward(prepare_batch(
        [Datum(model_input=d.model_input, loss_fn_inputs={"target_tokens": TensorData.from_torch(topk[:, 0])})],
        "cross_entropy", None, engine.vocab_size), backward=False)["loss_fn_outputs"][0]["logprobs"]).to_torch()
    torch.testing.assert_close(lp[:, 0], first, atol=1e-6, rtol=0)


def test_gather_logprobs_matches_per_row_log_softmax_in_values_and_gradients() -> None:
    # Mixed lengths (padding) and a [N, K] target beside [N] targets.
    gen = torch.Generator().manual_seed(11)
    vocab = 50
    ds = []
    for n, k in ((5, None), (3, 4), (6, None)):
        ids = torch.randint(0, vocab, (n,), generator=gen)
        target = torch.randint(0, vocab, (n,) if k is None else (n, k), generator=gen)
        ds.append(Datum(model_input=ModelInput.from_ints(ids.tolist()),
                        loss_fn_inputs={"target_tokens": TensorData.from_torch(target)}))
    batch = prepare_batch(ds, "cross_entropy", None, vocab)
    logits = torch.randn(3, 6, vocab, generator=gen, requires_grad=True)
    weights = [torch.rand(t.shape, generator=gen) for t in batch.targets]

    got = gather_logprobs(logits, batch)
    sum((lp * w).sum() for lp, w in zip(got, weights, strict=True)).backward()
    got_grad, logits.grad = logits.grad.clone(), None

    expected = []
    for i, (n, t) in enumerate(zip(batch.lengths, batch.targets, strict=True)):
        logp = torch.log_softmax(logits[i, :n], dim=-1)
        expected.append(logp.gather(-1, t.view(n, -1)).view(t.shape))
    sum((lp * w).sum() for lp, w in zip(expected, weights, strict=True)).backward()

    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e)
    torch.testing.assert_close(got_grad, logits.grad)
    assert got_grad[0, 5:].abs().sum() == 0  # padded positions get no gradient


def _state(engine: TrainerEngine) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    weights = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    assert engine.optimizer is not None
    moments = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
               for st in engine.optimizer.state.values()]
    return weights, moments


def _same_state(a: tuple, b: tuple) -> bool:
    (wa, ma), (wb, mb) = a, b
    return (all(torch.equal(wa[k], wb[k]) for k in wa) and len(ma) == len(mb)
            and all(all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)
                    for x, y in zip(ma, mb, strict=True)))


def test_non_finite_gradients_or_updates_are_refused_leaving_weights_and_optimizer_untouched() -> None:
    from firetitan.errors import NonFiniteError

    engine = TrainerEngine("e", ModelSpec(NANO), store=None, states=None)
    ds = data()
    engine.forward(prepare_batch(ds, "cross_entropy", None, engine.vocab_size), backward=True)
    engine.optim_step(AdamParams(learning_rate=1e-3))  # optimizer state exists from here on
    engine.forward(prepare_batch(ds, "cross_entropy", None, engine.vocab_size), backward=True)
    before = _state(engine)
    grads = [p.grad.clone() for p in engine.params]
    p0 = engine.params[0]

    # A gradient holding inf: refused before anything is touched.
    p0.grad[0] = float("inf")
    with pytest.raises(NonFiniteError):
        engine.optim_step(AdamParams(learning_rate=1e-3))
    assert _same_state(before, _state(engine)) and engine.step == 1

    # A finite but huge gradient whose square overflows Adam's second moment: caught by the check.
    p0.grad.copy_(grads[0])
    p0.grad[0] = 1e30
    with pytest.raises(NonFiniteError) as err:
        engine.optim_step(AdamParams(learning_rate=1e-3))
    assert err.value.field == "adam_params"
    assert _same_state(before, _state(engine)) and engine.step == 1

    # With the gradient restored, the same step goes through and changes the weights.
    p0.grad.copy_(grads[0])
    engine.optim_step(AdamParams(learning_rate=1e-3))
    assert engine.step == 2 and not _same_state(before, _state(engine))


def test_a_backward_with_non_finite_loss_keeps_the_accumulated_gradients() -> None:
    from firetitan.errors import NonFiniteError

    engine = TrainerEngine("e", ModelSpec(NANO), store=None, states=None)
    ds = data()
    engine.forward(prepare_batch(ds, "cross_entropy", None, engine.vocab_size), backward=True)
    grads = [p.grad.clone() for p in engine.params]
    # Sampler logprobs of -1e30 make the importance ratio exp(lp - q) infinite.
    bad = [Datum(model_input=d.model_input, loss_fn_inputs={
        "target_tokens": d.loss_fn_inputs["target_tokens"],
        "logprobs": TensorData.from_torch(torch.full((d.model_input.length,), -1e30)),
        "advantages": TensorData.from_torch(torch.ones(d.model_input.length))}) for d in ds]
    with pytest.raises(NonFiniteError) as err:
        engine.forward(prepare_batch(bad, "importance_sampling", None, engine.vocab_size), backward=True)
    assert err.value.field == "loss"
    assert engine.pending_backward == 1
    assert all(torch.equal(p.grad, g) for p, g in zip(engine.params, grads, strict=True))


def test_automatic_snapshots_start_a_new_base_once_a_delta_stops_paying(tmp_path, monkeypatch) -> None:
    from firetitan.checkpoints import SnapshotStore
    from firetitan.server.trainer import snapshots as snapshots_module

    # One AdamW step on nano gives a float32 delta of ~0.45-0.5x a full save; a 0.3 threshold keeps the
    # test about the policy, not about how well this step's XOR bytes compress.
    monkeypatch.setattr(snapshots_module, "REBASE_DELTA_FRACTION", 0.3)
    REBASE_DELTA_FRACTION = snapshots_module.REBASE_DELTA_FRACTION
    engine = TrainerEngine("e", ModelSpec(NANO), store=SnapshotStore(tmp_path), states=None)
    kinds = [engine.save_for_sampler("s0", "c", None)]
    unchanged = engine.save_for_sampler("s1", "c", None)  # same weights: a tiny delta, keep the base
    kinds.append(unchanged)
    batch = prepare_batch(data(), "cross_entropy", None, engine.vocab_size, engine.pad_id)
    engine.forward(batch, backward=True)
    engine.optim_step(AdamParams(learning_rate=1e-2))  # every weight moves: a delta near full size
    kinds.append(engine.save_for_sampler("s2", "c", None))
    kinds.append(engine.save_for_sampler("s3", "c", None))
    assert [k["checkpoint_type"] for k in kinds] == ["base", "delta", "delta", "base"], kinds
    assert unchanged["size_bytes"] < REBASE_DELTA_FRACTION * unchanged["full_size_bytes"]
    assert kinds[2]["size_bytes"] > REBASE_DELTA_FRACTION * kinds[2]["full_size_bytes"]
    assert kinds[2]["previous_snapshot_identity"] == kinds[0]["path"]
    # An explicit choice still wins over the policy.
    assert engine.save_for_sampler("s4", "c", "delta")["checkpoint_type"] == "delta"
