"""A 2-rank FSDP2 trainer (gloo, CPU) against the 1-rank trainer: same numbers, cross-size resume."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from test_trainer_worker import batch, max_diff
from trainer_procs import NANO, Trainer, start_trainer

from firetitan.checkpoints import SnapshotStore
from firetitan.client.training import TrainingClient
from firetitan.types import AdamParams, Datum

pytestmark = pytest.mark.slow

TOL = 1e-5
# Adam divides by sqrt(v) + eps, so a gradient entry near zero, whose float32 value depends on the
# summation order (one batch vs two halves reduced), moves its weight by up to lr * noise / eps: at
# lr=1e-2 the weights of the two trainers drifted 3.2e-5 apart in 3 steps while the gradient norms
# agreed to ~1e-6 relative; at 1e-3 the drift is 3.2e-6. The gradient itself is what is compared.
PARAMS = AdamParams(learning_rate=1e-3, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.01, grad_clip_norm=20.0)


@dataclass
class Pair:
    one: Trainer
    two: Trainer


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("data-parallel")
    state = root / "state"  # shared: a state saved by one trainer loads in the other
    args = ("--base-model", NANO, "--job-id", "dp", "--autosave-every", "0")
    one = start_trainer(root / "one", *args, state_dir=state)
    try:
        two = start_trainer(root / "two", *args, "--world-size", "2", state_dir=state)
    except BaseException:
        one.process.stop()
        raise
    try:
        yield Pair(one, two)
    finally:
        two.process.stop()
        one.process.stop()


def _client(t: Trainer) -> TrainingClient:
    return TrainingClient.create(t.url, NANO)


def _weights(tc: TrainingClient, t: Trainer, name: str) -> dict[str, torch.Tensor]:
    snap = tc.save_weights_for_sampler(name, checkpoint_type="base").result(120)
    return SnapshotStore(t.store_dir).load_state_dict(snap.path)


def _squared(ds: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Not cross-entropy: the gradient weight differs per token (2 * lp * w)."""
    loss = sum(((lp * d.loss_fn_inputs["weights"].to_torch()) ** 2).sum() for d, lp in zip(ds, logprobs, strict=True))
    return loss, {}


def _rank_pids(t: Trainer) -> list[int]:
    return [c.pid for c in psutil.Process(t.process.pid).children(recursive=True)]


def test_two_ranks_match_one_rank_for_cross_entropy_and_a_custom_loss(pair: Pair) -> None:
    a, b = _client(pair.one), _client(pair.two)
    try:
        assert len(_rank_pids(pair.two)) == 1 and _rank_pids(pair.one) == []
        # One starting point for both, whatever earlier tests did: the 1-rank trainer's weights.
        start = a.save_state("parity-start", overwrite=True).result(120).path
        a.load_state(start).result(120)
        b.load_state(start).result(120)
        worst = {"loss": 0.0, "grad_norm": 0.0, "logprobs": 0.0}
        for step in range(3):
            data = batch(100 + step, [5, 9, 3])  # 3 datums on 2 ranks: an uneven split (2 + 1)
            fa, fb = a.forward_backward(data, "cross_entropy"), b.forward_backward(data, "cross_entropy")
            ra, rb = fa.result(120), fb.result(120)
            worst["loss"] = max(worst["loss"], abs(ra.metrics["loss:sum"] - rb.metrics["loss:sum"]))
            assert rb.metrics["loss:sum"] == pytest.approx(ra.metrics["loss:sum"], rel=TOL)
            for oa, ob in zip(ra.loss_fn_outputs, rb.loss_fn_outputs, strict=True):
                la, lb = oa["logprobs"].to_torch(), ob["logprobs"].to_torch()
                assert la.shape == lb.shape
                worst["logprobs"] = max(worst["logprobs"], float((la - lb).abs().max()))
            sa, sb = a.optim_step(PARAMS).result(120), b.optim_step(PARAMS).result(120)
            worst["grad_norm"] = max(worst["grad_norm"], abs(sa.metrics["grad_norm"] - sb.metrics["grad_norm"]))
            assert sb.metrics["grad_norm"] == pytest.approx(sa.metrics["grad_norm"], rel=TOL)
        assert worst["logprobs"] <= TOL
        ce_weights = max_diff(_weights(a, pair.one, "ce-1"), _weights(b, pair.two, "ce-2"))
        assert ce_weights <= TOL

        for step in range(3):
            data = batch(200 + step, [4, 7, 6, 3, 8])
            ra = a.forward_backward_custom(data, _squared).result(120)
            rb = b.forward_backward_custom(data, _squared).result(120)
            assert rb.metrics["loss:sum"] == pytest.approx(ra.metrics["loss:sum"], rel=TOL)
            worst["loss"] = max(worst["loss"], abs(ra.metrics["loss:sum"] - rb.metrics["loss:sum"]))
            sa, sb = a.optim_step(PARAMS).result(120), b.optim_step(PARAMS).result(120)
            assert sb.metrics["grad_norm"] == pytest.approx(sa.metrics["grad_norm"], rel=TOL)
            worst["grad_norm"] = max(worst["grad_norm"], abs(sa.metrics["grad_norm"] - sb.metrics["grad_norm"]))
        custom_weights = max_diff(_weights(a, pair.one, "custom-1"), _weights(b, pair.two, "custom-2"))
        assert custom_weights <= TOL
        assert a.get_info().result(60).step == b.get_info().result(60).step
        print(f"\ndata-parallel parity (ws2 vs ws1, max abs diff): {worst}, weights after CE {ce_weights:.2e}, "
              f"after custom {custom_weights:.2e}")
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("saver", ["two", "one"])
def test_a_state_saved_with_one_world_size_resumes_exactly_with_the_other(pair: Pair, saver: str) -> None:
    src_t, dst_t = (pair.two, pair.one) if saver == "two" else (pair.one, pair.two)
    src, dst = _client(src_t), _client(dst_t)
    try:
        for step in range(2):
            src.forward_backward(batch(300 + step, [6, 4, 9]), "cross_entropy").result(120)
            src.optim_step(PARAMS).result(120)
        name = f"saved-by-{saver}"
        path = src.save_state(name, overwrite=True).result(120).path
        dst.load_state_with_optimizer(path).result(120)
        assert dst.get_info().result(60).step == src.get_info().result(60).step
        # The next step from the saved state is the same on both: weights and Adam moments resumed.
        data = batch(400, [3, 8, 5, 7])
        for tc in (src, dst):
            tc.forward_backward(data, "cross_entropy").result(120)
        norms = [tc.optim_step(PARAMS).result(120).metrics["grad_norm"] for tc in (src, dst)]
        assert norms[1] == pytest.approx(norms[0], rel=TOL)
        diff = max_diff(_weights(src, src_t, f"{name}-src"), _weights(dst, dst_t, f"{name}-dst"))
        assert diff <= TOL
        print(f"\nresume saved by {saver} rank(s): weights max diff {diff:.2e}")
        saved = Path(src_t.state_dir) / "states" / name
        shards = sorted(p.name for p in saved.glob("*.distcp"))
        assert len(shards) == (2 if saver == "two" else 1), shards  # one DCP file per writing rank
    finally:
        src.close()
        dst.close()


def test_a_killed_two_rank_worker_leaves_no_rank_and_restarts_from_its_sharded_autosave(tmp_path: Path) -> None:
    args = ("--base-model", NANO, "--job-id", "dp", "--autosave-every", "2", "--world-size", "2")
    first = start_trainer(tmp_path / "first", *args, state_dir=tmp_path / "state")
    try:
        tc = _client(first)
        for step in range(3):  # autosaved (all ranks' shards) at step 2; step 3 is lost below
            tc.forward_backward(batch(500 + step, [5, 6]), "cross_entropy").result(120)
            tc.optim_step(PARAMS).result(120)
            if step == 1:
                at_two = _weights(tc, first, "at-two")
        ranks = [psutil.Process(pid) for pid in _rank_pids(first)]
        assert len(ranks) == 1
        tc.close()
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.popen.wait(30)
        deadline = time.monotonic() + 10  # the rank's parent watchdog polls every 0.5 s
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks):
            assert time.monotonic() < deadline, "rank 1 outlived a killed rank 0"
            time.sleep(0.1)
    finally:
        first.process.stop()
    second = start_trainer(tmp_path / "second", *args, state_dir=tmp_path / "state")
    try:
        tc = _client(second)
        info = tc.get_info().result(60)
        assert (info.step, info.restored_from_step, info.steps_lost) == (2, 2, 1)
        assert max_diff(at_two, _weights(tc, second, "restored")) <= TOL
        tc.close()
    finally:
        second.process.stop()


def test_killing_rank_1_fails_the_pending_future_with_a_typed_error_naming_it(tmp_path: Path) -> None:
    from firetitan.errors import WorkerCrashedError

    trainer = start_trainer(tmp_path, "--base-model", NANO, "--job-id", "dp", "--world-size", "2")
    try:
        tc = _client(trainer)
        rank0 = psutil.Process(trainer.process.pid)
        ranks = rank0.children(recursive=True)
        future = tc.forward_backward(batch(600, [400] * 48), "cross_entropy")
        time.sleep(1.0)
        assert not future.done(), "the forward_backward finished before the kill: make it bigger"
        os.kill(ranks[0].pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(WorkerCrashedError) as err:
            future.result(60)
        print(f"\nrank kill (direct HTTP): typed error {time.monotonic() - killed:.2f}s after kill -9: {err.value}")
        assert f"trainer rank 1 of 2 (pid {ranks[0].pid}) exited with code -9" in str(err.value)
        assert trainer.process.popen is not None and trainer.process.popen.wait(30) == 1
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
        tc.close()
    finally:
        trainer.process.stop()
    assert "trainer rank 1 of 2" in (tmp_path / "trainer.log").read_text().strip().splitlines()[-1]


def test_a_non_finite_loss_on_one_rank_is_refused_by_all_and_the_job_goes_on(pair: Pair) -> None:
    from firetitan.errors import NonFiniteError
    from firetitan.types import ModelInput, TensorData

    def rl_datum(tokens: list[int], logprob: float) -> Datum:
        n = len(tokens) - 1
        return Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
            "target_tokens": TensorData.from_list(tokens[1:], "int64"),
            "logprobs": TensorData.from_list([logprob] * n, "float32"),
            "advantages": TensorData.from_list([1.0] * n, "float32")})

    good = rl_datum([5, 17, 42, 99, 7, 300], -2.0)
    poisoned = rl_datum([8, 21, 33, 4, 5], -1e30)  # exp(lp - q) overflows: an infinite loss on rank 1 only
    a, b = _client(pair.one), _client(pair.two)
    try:
        start = a.save_state("finite-start", overwrite=True).result(120).path
        for tc in (a, b):
            tc.load_state(start).result(120)
            tc.forward_backward([good, good], "importance_sampling").result(120)
            with pytest.raises(NonFiniteError) as err:
                tc.forward_backward([good, poisoned], "importance_sampling").result(120)
            assert err.value.field == "loss"
        sa, sb = a.optim_step(PARAMS).result(120), b.optim_step(PARAMS).result(120)
        assert sa.metrics["accumulated_backwards"] == sb.metrics["accumulated_backwards"] == 1.0
        assert sb.metrics["grad_norm"] == pytest.approx(sa.metrics["grad_norm"], rel=TOL)
        assert max_diff(_weights(a, pair.one, "finite-1"), _weights(b, pair.two, "finite-2")) <= TOL
    finally:
        a.close()
        b.close()
