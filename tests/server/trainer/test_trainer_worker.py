"""The trainer worker over real HTTP: logprobs, losses, custom losses, snapshots, resume, ordering."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch
from trainer_procs import NANO, Trainer, start_trainer

from firetitan.checkpoints import SnapshotStore
from firetitan.client.http import HttpClient
from firetitan.client.training import TrainingClient
from firetitan.errors import InvalidRequestError, NotFoundError
from firetitan.futures import run_sync
from firetitan.types import AdamParams, Datum, ModelInput, TensorData


def datum(seq: list[int], weights: list[float] | None = None, **extra: list[float]) -> Datum:
    n = len(seq) - 1
    inputs: dict[str, TensorData] = {"target_tokens": TensorData.from_list(seq[1:], "int64")}
    if weights is not None:
        inputs["weights"] = TensorData.from_list(weights, "float32")
    for key, values in extra.items():
        inputs[key] = TensorData.from_list(values, "float32")
    assert all(td.size == n for td in inputs.values())
    return Datum(model_input=ModelInput.from_ints(seq[:-1]), loss_fn_inputs=inputs)


def batch(seed: int, lengths: list[int]) -> list[Datum]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        seq = [rng.randrange(3, 4096) for _ in range(n + 1)]
        out.append(datum(seq, [rng.choice([0.0, 0.5, 1.0]) for _ in range(n)]))
    return out


@pytest.fixture
def make_client(trainer: Trainer) -> Iterator:
    made: list[TrainingClient] = []

    def make(url: str | None = None, **kwargs) -> TrainingClient:
        tc = TrainingClient.create(url or trainer.url, NANO, **kwargs)
        made.append(tc)
        return tc

    yield make
    for tc in made:
        try:
            tc.unload_model().result(30)
        except Exception:
            pass
        tc.close()


def snapshot_weights(tc: TrainingClient, store: SnapshotStore, name: str) -> dict[str, torch.Tensor]:
    snap = tc.save_weights_for_sampler(name, checkpoint_type="base").result()
    return store.load_state_dict(snap.path)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def direct_logprobs(model: torch.nn.Module, d: Datum) -> torch.Tensor:
    ids = torch.tensor([d.model_input.to_ints()])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    target = d.loss_fn_inputs["target_tokens"].to_torch()
    return torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0]


def test_forward_logprobs_match_transformers_on_the_base_snapshot(trainer: Trainer, make_client) -> None:
    from transformers import AutoModelForCausalLM

    tc = make_client()
    data = batch(1, [9, 5, 12])  # uneven lengths: the trainer pads, the direct computation does not
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(AdamParams(learning_rate=1e-2)).result()
    snap = tc.save_weights_for_sampler("fwd").result()
    assert snap.checkpoint_type == "base" and snap.path.endswith(f"-{tc.session_id}")
    out = tc.forward(data).result()

    store = SnapshotStore(trainer.store_dir)
    model = AutoModelForCausalLM.from_pretrained(store.base_dir(snap.path), attn_implementation="eager").eval()
    for d, o in zip(data, out.loss_fn_outputs, strict=True):
        got = o["logprobs"].to_torch()
        assert got.shape == (d.model_input.length,)
        torch.testing.assert_close(got, direct_logprobs(model, d), atol=1e-5, rtol=0)
    expected_loss = -sum(float((o["logprobs"].to_torch() * d.loss_fn_inputs["weights"].to_torch()).sum())
                         for d, o in zip(data, out.loss_fn_outputs, strict=True))
    assert out.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5)


def test_custom_loss_equal_to_cross_entropy_gives_the_same_weights(trainer: Trainer, make_client) -> None:
    builtin, custom = make_client(), make_client()
    data = batch(2, [7, 11])
    params = AdamParams(learning_rate=5e-3, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.01)

    def ce(ds: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(ds, logprobs, strict=True))
        return loss, {"n_datums:sum": float(len(ds))}

    a = builtin.forward_backward(data, "cross_entropy").result()
    b = custom.forward_backward_custom(data, ce).result()
    assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-6)
    assert b.metrics["surrogate_loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-6)
    assert b.metrics["n_datums:sum"] == 2.0
    sa, sb = builtin.optim_step(params).result(), custom.optim_step(params).result()
    assert sa.metrics["grad_norm"] == pytest.approx(sb.metrics["grad_norm"], rel=1e-6)
    store = SnapshotStore(trainer.store_dir)
    assert max_diff(snapshot_weights(builtin, store, "ce"), snapshot_weights(custom, store, "custom")) <= 1e-6


def test_base_then_lossless_deltas(trainer: Trainer, make_client) -> None:
    from transformers import AutoModelForCausalLM

    tc = make_client()
    store = SnapshotStore(trainer.store_dir)
    s0 = tc.save_weights_for_sampler("chain-0").result()
    assert s0.checkpoint_type == "base"
    hf = AutoModelForCausalLM.from_pretrained(store.base_dir(s0.path))
    base_sd = store.load_state_dict(s0.path)
    assert all(torch.equal(v, base_sd[k]) for k, v in hf.state_dict().items())

    deltas = []
    for i in range(2):
        tc.forward_backward(batch(10 + i, [16, 16]), "cross_entropy").result()
        tc.optim_step(AdamParams(learning_rate=1e-3)).result()
        deltas.append(tc.save_weights_for_sampler(f"chain-{i + 1}").result())
    for d in deltas:
        assert d.checkpoint_type == "delta"
        assert d.previous_snapshot_identity == s0.path
        assert d.size_bytes < d.full_size_bytes
    current = snapshot_weights(tc, store, "chain-ref")  # an explicit base of the same weights
    applied = store.load_state_dict(deltas[-1].path, base_sd)
    assert applied.keys() == current.keys()
    assert all(torch.equal(applied[k], current[k]) for k in current)


def test_lora_adapter_loads_in_peft_and_reproduces_logprobs(trainer: Trainer, make_client) -> None:
    from peft import PeftModel

    from firetitan.models import load_model

    tc = make_client(lora_config={"rank": 4, "alpha": 16, "seed": 7, "train_unembed": False})
    info = tc.get_info().result()
    assert info.is_lora and info.lora_rank == 4 and 0 < info.num_trainable_params < info.num_params
    data = batch(3, [10, 6])
    for _ in range(2):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(AdamParams(learning_rate=2e-2)).result()
    snap = tc.save_weights_for_sampler("adapter").result()
    assert snap.checkpoint_type == "lora"
    trained = tc.forward(data).result()
    reference = tc.forward(data, disable_adapter=True).result()

    store = SnapshotStore(trainer.store_dir)
    base = load_model(NANO)
    base_lps = [direct_logprobs(base, d) for d in data]
    peft_model = PeftModel.from_pretrained(base, str(store.lora_dir(snap.path))).eval()
    for d, o, ref, base_lp in zip(data, trained.loss_fn_outputs, reference.loss_fn_outputs, base_lps, strict=True):
        torch.testing.assert_close(o["logprobs"].to_torch(), direct_logprobs(peft_model, d), atol=1e-5, rtol=0)
        torch.testing.assert_close(ref["logprobs"].to_torch(), base_lp, atol=1e-5, rtol=0)
        assert float((o["logprobs"].to_torch() - base_lp).abs().max()) > 1e-4  # the adapter did train
    assert tc.get_info().result().step == 2


LRS = [1e-2, 5e-3, 2e-3, 1e-3]  # a schedule: each step must use exactly its own learning rate


def train_steps(tc: TrainingClient, steps: range) -> None:
    for i in steps:
        tc.forward_backward(batch(100 + i, [12, 8]), "cross_entropy").result()
        tc.optim_step(AdamParams(learning_rate=LRS[i], eps=1e-8, weight_decay=0.1)).result()


@pytest.mark.slow
def test_resume_with_optimizer_is_exact_and_load_state_resets_it(trainer: Trainer, make_client,
                                                                 tmp_path) -> None:
    straight = make_client()
    train_steps(straight, range(4))
    store = SnapshotStore(trainer.store_dir)
    w_straight = snapshot_weights(straight, store, "straight")

    first = make_client()
    train_steps(first, range(2))
    saved = first.save_state(f"resume-{first.session_id}").result()
    assert saved.path in first.list_checkpoints().result()

    # A new trainer process reading the same state directory, with its model preloaded from flags.
    other = start_trainer(tmp_path, "--base-model", NANO, "--job-id", "resumed", state_dir=trainer.state_dir)
    resumed = TrainingClient(other.url, "resumed")
    try:
        resumed.load_state_with_optimizer(saved.path).result()
        assert resumed.get_info().result().step == 2
        train_steps(resumed, range(2, 4))
        w_resumed = snapshot_weights(resumed, SnapshotStore(other.store_dir), "resumed")

        weights_only = make_client(other.url)
        weights_only.load_state(saved.path).result()
        train_steps(weights_only, range(2, 4))
        w_fresh_optim = snapshot_weights(weights_only, SnapshotStore(other.store_dir), "fresh-optim")
    finally:
        resumed.close()
        other.process.stop()
    assert max_diff(w_resumed, w_straight) <= 1e-6
    # Fresh Adam moments (first step ~ lr * sign(g)) move the weights differently.
    assert max_diff(w_fresh_optim, w_straight) > 1e-4


def test_back_to_back_submission_equals_sequential_awaiting(make_client) -> None:
    import tinker

    b0, b1, b2 = batch(20, [9, 4]), batch(21, [6]), batch(22, [8, 8])
    adam = AdamParams(learning_rate=1e-2)
    piped, seq = make_client(), make_client()
    futures = [piped.forward_backward(b0, "cross_entropy"), piped.forward_backward(b1, "cross_entropy"),
               piped.optim_step(adam), piped.forward(b2), piped.forward_backward(b2, "cross_entropy"),
               piped.optim_step(adam), piped.forward(b0)]
    got = [f.result() for f in futures]
    # The sequential run uses real tinker types, which the client must accept as well.
    as_tinker = [[tinker.Datum(model_input=tinker.ModelInput.from_ints(d.model_input.to_ints()),
                               loss_fn_inputs={k: v.tolist() for k, v in d.loss_fn_inputs.items()})
                  for d in b] for b in (b0, b1, b2)]
    t_adam = tinker.AdamParams(learning_rate=1e-2)
    want = [seq.forward_backward(as_tinker[0], "cross_entropy").result(),
            seq.forward_backward(as_tinker[1], "cross_entropy").result(),
            seq.optim_step(t_adam).result(), seq.forward(as_tinker[2]).result(),
            seq.forward_backward(as_tinker[2], "cross_entropy").result(),
            seq.optim_step(t_adam).result(), seq.forward(as_tinker[0]).result()]
    for g, w in zip(got, want, strict=True):
        assert g.metrics == w.metrics
        for go, wo in zip(getattr(g, "loss_fn_outputs", []), getattr(w, "loss_fn_outputs", []), strict=True):
            assert go["logprobs"] == wo["logprobs"]
    assert got[2].metrics["accumulated_backwards"] == 2.0

    # Accumulating two forward_backward calls == one call on both batches (a sum loss).
    once = make_client()
    once.forward_backward(b0 + b1, "cross_entropy").result()
    assert once.optim_step(adam).result().metrics["grad_norm"] == pytest.approx(got[2].metrics["grad_norm"],
                                                                                rel=1e-5)


def test_rl_losses_run_end_to_end(make_client) -> None:
    tc = make_client()
    data = batch(30, [6, 6])
    lps = [o["logprobs"].tolist() for o in tc.forward(data).result().loss_fn_outputs]
    rl = [datum([*d.model_input.to_ints(), int(d.loss_fn_inputs["target_tokens"].data[-1])],
                logprobs=[x - 0.1 for x in lp], advantages=[1.0, -1.0, 0.5, 0.0, 2.0, -0.5])
          for d, lp in zip(data, lps, strict=True)]
    r = 2.718281828459045 ** 0.1  # every ratio is exp(0.1)
    adv_sum = 2 * (1.0 - 1.0 + 0.5 + 0.0 + 2.0 - 0.5)
    out = tc.forward_backward(rl, "importance_sampling").result()
    assert out.metrics["loss:sum"] == pytest.approx(-r * adv_sum, rel=1e-4)
    out = tc.forward_backward(rl, "ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}).result()
    assert out.metrics["clip_fraction:mean"] > 0
    for name, cfg in (("cispo", None), ("dro", {"beta": 0.05})):
        assert "loss:sum" in tc.forward_backward(rl, name, cfg).result().metrics
    assert tc.optim_step(AdamParams(learning_rate=1e-3)).result().metrics["accumulated_backwards"] == 4.0


def test_bad_input_is_a_400_naming_the_field_and_the_worker_keeps_serving(trainer: Trainer, make_client) -> None:
    tc = make_client()
    good = batch(40, [5])
    d = good[0]
    ids = d.model_input.to_ints()
    short = Datum(model_input=d.model_input, loss_fn_inputs={"target_tokens": TensorData.from_list(ids[1:], "int64")})
    huge_input = datum([5, 4096, 7])
    huge_target = datum([5, 6, 99999])
    cases = [
        (lambda: tc.forward_backward([short], "cross_entropy"), "data[0].loss_fn_inputs.target_tokens"),
        (lambda: tc.forward([huge_input]), "data[0].model_input"),
        (lambda: tc.forward_backward([huge_target], "cross_entropy"), "data[0].loss_fn_inputs.target_tokens"),
        (lambda: tc.forward_backward(good, "importance_sampling"), "data[0].loss_fn_inputs.logprobs"),
        (lambda: tc.forward_backward(good, "not_a_loss"), "loss_fn"),
        (lambda: tc.forward_backward(good, "ppo", {"clip_epsilon": 0.2}), "loss_fn_config.clip_epsilon"),
        (lambda: tc.save_weights_for_sampler("a/b"), "name"),
        (lambda: tc.save_weights_for_sampler(".."), "name"),
        (lambda: tc.save_weights_for_sampler("x..y"), "name"),
        (lambda: tc.save_state("../escape"), "name"),
        (lambda: tc.optim_step({"learning_rate": -1.0}), "adam_params.learning_rate"),
    ]
    for submit, field in cases:
        with pytest.raises(InvalidRequestError) as err:
            submit().result(60)
        assert err.value.field == field, (field, err.value)
        assert tc.forward(good).result(60).loss_fn_outputs  # still serving, same client
    with pytest.raises(NotFoundError) as nf:
        tc.load_state("never-saved").result(60)
    assert nf.value.field == "path"
    with pytest.raises(InvalidRequestError) as err:
        tc.load_state("tinker://run/sampler_weights/x").result(60)
    assert err.value.field == "path"
    # save_state then load_state submitted back to back: the load sees the state the save wrote.
    name = f"pipelined-{tc.session_id}"
    saved, loaded = tc.save_state(name), tc.load_state_with_optimizer(name)
    assert loaded.result(60).path == saved.result(60).path == name
    # A rejected submission in the middle of a pipeline does not hold back the ones behind it.
    bad, after = tc.forward([huge_input]), tc.forward(good)
    with pytest.raises(InvalidRequestError):
        bad.result(60)
    assert after.result(60).loss_fn_outputs
    # Nor does a cancelled call (started or not): its seq_id is given up.
    first, cancelled = tc.forward(good), tc.forward(good)
    cancelled.cancel()
    assert first.result(60).loss_fn_outputs and tc.forward(good).result(60).loss_fn_outputs


def test_results_can_be_retrieved_again_and_health_reports_models(trainer: Trainer, make_client) -> None:
    tc = make_client()
    http = HttpClient(trainer.url)

    async def scenario() -> tuple[dict, dict, dict, dict]:
        body = {"model_id": tc.model_id, "forward_input": {"data": [d.to_wire() for d in batch(50, [4])],
                                                           "loss_fn": "cross_entropy"}}
        rid = (await http.request_json("POST", "/api/v1/forward", json=body))["request_id"]
        first = await http.request_json("POST", "/api/v1/retrieve_future", json={"request_id": rid})
        again = await http.request_json("POST", "/api/v1/retrieve_future", json={"request_id": rid})
        health = await http.request_json("GET", "/api/v1/healthz")
        try:
            await http.request_json("POST", "/api/v1/retrieve_future", json={"request_id": "nope"})
        except NotFoundError as exc:
            missing = {"field": exc.field}
        await http.close()
        return first, again, health, missing

    first, again, health, missing = run_sync(scenario())
    assert first == again and first["metrics"]["loss:sum"] > 0
    assert health["status"] == "ok" and health["models"][tc.model_id]["loaded"]
    assert missing == {"field": "request_id"}


def test_forward_only_reference_model_refuses_training(make_client) -> None:
    tc = make_client(forward_only=True)
    data = batch(60, [5])
    assert tc.forward(data).result(60).loss_fn_outputs
    for call in (lambda: tc.optim_step(AdamParams()), lambda: tc.forward_backward(data, "cross_entropy"),
                 lambda: tc.save_state("x"), lambda: tc.save_weights_for_sampler("x")):
        with pytest.raises(InvalidRequestError) as err:
            call().result(60)
        assert err.value.field == "model_id"
    info = tc.get_info().result(60)
    assert info.forward_only and info.model_name == NANO and info.optimizer_config is None


async def test_async_forms_from_a_running_event_loop(make_client) -> None:
    tc = make_client()
    data = batch(70, [6, 3])
    fb = tc.forward_backward(data, "cross_entropy")  # plain call: an APIFuture, awaitable here
    step = await tc.optim_step_async(AdamParams(learning_rate=1e-3))
    assert (await fb).metrics["loss:sum"] > 0 and step.metrics["accumulated_backwards"] == 1.0
    out = await tc.forward_async(data)
    assert [o["logprobs"].shape for o in out.loss_fn_outputs] == [[6], [3]]
    info = await tc.get_info_async()
    assert info.step == 1 and info.policy_version == 1
