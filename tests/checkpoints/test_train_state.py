"""DCP train state: resume with optimizer is bit-identical to training straight through; weights-only resets."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, get_peft_model

from firetitan.checkpoints import TrainStateStore, load_train_state, save_train_state
from firetitan.checkpoints.train_state import TRAIN_STATE_FILE
from firetitan.errors import ConflictError, InvalidRequestError
from firetitan.models import load_model

NANO = "firetitan/nano-qwen3"

LR = 1e-3


def _fresh(seed: int | None = None) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    model = load_model(NANO, seed=seed)
    return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def _two_then_two(adamw_steps, model, opt, resumed_model, resumed_opt, store: TrainStateStore, name: str):
    adamw_steps(model, opt, 2, seed=0)
    store.save(name, model, opt, step=2, extra={"cursor": 24})
    return store.load(name, resumed_model, resumed_opt)


def _assert_models_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_resume_with_optimizer_is_identical_to_straight_training(adamw_steps, tmp_path) -> None:
    straight, straight_opt = _fresh()
    adamw_steps(straight, straight_opt, 2, seed=0)
    adamw_steps(straight, straight_opt, 2, seed=1)

    store = TrainStateStore(tmp_path)
    model, opt = _fresh()
    resumed, resumed_opt = _fresh(seed=7)  # different weights before loading
    step, extra = _two_then_two(adamw_steps, model, opt, resumed, resumed_opt, store, "step-2")
    assert (step, extra) == (2, {"cursor": 24})
    saved_state = opt.state_dict()["state"]
    for pid, state in resumed_opt.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], saved_state[pid][key]), (pid, key)
    adamw_steps(resumed, resumed_opt, 2, seed=1)
    _assert_models_equal(resumed, straight)

    info = json.loads((store.path("step-2") / TRAIN_STATE_FILE).read_text())
    assert info["step"] == 2 and info["has_optimizer"] is True and info["name"] == "step-2"
    assert store.info("tinker://run-1/weights/step-2").step == 2
    assert [i.name for i in store.list()] == ["step-2"]


def test_load_without_optimizer_restores_weights_and_leaves_optimizer_empty(adamw_steps, tmp_path) -> None:
    model, opt = _fresh()
    adamw_steps(model, opt, 2, seed=0)
    path = tmp_path / "weights-only-source"
    save_train_state(path, model, opt, step=2, extra={})

    restored, restored_opt = _fresh(seed=7)
    assert load_train_state(path, restored) == (2, {})
    _assert_models_equal(restored, model)
    assert len(restored_opt.state) == 0
    # The reset shows: one more step with a fresh optimizer departs from the continued trajectory.
    adamw_steps(model, opt, 1, seed=1)
    adamw_steps(restored, restored_opt, 1, seed=1)
    assert not torch.equal(model.state_dict()["model.norm.weight"], restored.state_dict()["model.norm.weight"])


def test_weights_only_state_refuses_optimizer_load(tmp_path) -> None:
    model, _ = _fresh()
    save_train_state(tmp_path / "w", model, None, step=0)
    other, other_opt = _fresh(seed=3)
    with pytest.raises(InvalidRequestError, match="without optimizer"):
        load_train_state(tmp_path / "w", other, other_opt)
    assert load_train_state(tmp_path / "w", other) == (0, {})
    _assert_models_equal(other, model)


def test_lora_resume_is_exact_and_saves_only_the_adapter(adamw_steps, tmp_path) -> None:
    def lora() -> tuple[torch.nn.Module, torch.optim.AdamW]:
        torch.manual_seed(0)
        peft_model = get_peft_model(load_model(NANO), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        return peft_model, torch.optim.AdamW(params, lr=1e-2)

    straight, straight_opt = lora()
    adamw_steps(straight, straight_opt, 2, seed=0)
    adamw_steps(straight, straight_opt, 2, seed=1)

    store = TrainStateStore(tmp_path)
    model, opt = lora()
    resumed, resumed_opt = lora()
    _two_then_two(adamw_steps, model, opt, resumed, resumed_opt, store, "lora-2")
    adamw_steps(resumed, resumed_opt, 2, seed=1)
    _assert_models_equal(resumed, straight)
    info = store.info("lora-2")
    assert info.num_params == 2 * 2 * 2  # (q, v) x (A, B) x 2 layers: frozen base weights are not saved


def test_existing_name_conflicts_unless_overwrite(tmp_path) -> None:
    store = TrainStateStore(tmp_path)
    model, opt = _fresh()
    store.save("step-1", model, opt, step=1)
    with pytest.raises(ConflictError) as info:
        store.save("step-1", model, opt, step=1)
    assert info.value.field == "name"
    store.save("step-1", model, opt, step=5, overwrite=True)
    assert store.info("step-1").step == 5
    with pytest.raises(InvalidRequestError) as bad:
        store.save("step-2", model, opt, step=2, extra={"x": object()})
    assert bad.value.field == "extra"
    assert not store.exists("step-2")
    assert sorted(p.name for p in store.states_dir.iterdir()) == ["step-1"]


def test_state_of_another_architecture_is_refused(tmp_path) -> None:
    model, opt = _fresh()
    save_train_state(tmp_path / "full", model, opt, step=1)
    lora_model = get_peft_model(load_model(NANO), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(InvalidRequestError, match="LoRA settings") as info:
        load_train_state(tmp_path / "full", lora_model)
    assert info.value.field == "path"


def test_a_state_outside_the_store_is_refused_before_reading(nano, tmp_path) -> None:
    """DCP unpickles metadata: only states inside the store are loaded (docs/security-and-limits.md)."""
    outside = tmp_path / "outside"
    save_train_state(outside, nano, None, step=1)
    store = TrainStateStore(tmp_path / "store")
    with pytest.raises(InvalidRequestError) as info:
        load_train_state(outside, nano, root=store.states_dir)
    assert info.value.field == "path" and "outside" in info.value.message
    for ref in ("../../outside", "tinker://run/weights/..", "tinker://run/weights/a%2F..%2Fb"):
        with pytest.raises(InvalidRequestError):
            store.load(ref, nano)
    os.symlink(outside, store.states_dir / "planted")
    with pytest.raises(InvalidRequestError, match="outside"):
        store.load("planted", nano)
