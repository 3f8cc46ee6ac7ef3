"""Pure runtime logic: staleness rules, the admission gate, advantages and the data cursor."""

from __future__ import annotations

import pytest

from firetitan.runtime.advantages import group_advantages, is_constant
from firetitan.runtime.cursor import DataCursor
from firetitan.runtime.periodic import due
from firetitan.runtime.staleness import StalenessGate, is_trainable, may_start, staleness


def test_staleness_rules() -> None:
    assert staleness(5, 3) == 2
    assert may_start(3, 3, 0) and not may_start(4, 3, 0)
    assert may_start(4, 3, 1) and not may_start(5, 3, 1)
    assert is_trainable(4, 3, 1) and not is_trainable(5, 3, 1)
    assert not is_trainable(2, 3, 4), "a sample from the future is a bookkeeping bug, never trainable"


def test_gate_on_policy_admits_one_batch_per_version() -> None:
    gate = StalenessGate(bound=0, groups_per_step=2)
    assert gate.admit() == 0 and gate.admit() == 0
    assert not gate.can_admit(), "bound 0: only one batch per version"
    gate.set_trainer_step(1)
    assert not gate.can_admit(), "trainer is ahead of the sampler"
    gate.set_sampler_version(1)
    assert gate.can_admit()


def test_gate_bound_one_allows_one_batch_ahead() -> None:
    gate = StalenessGate(bound=1, groups_per_step=1)
    assert gate.admit() == 0 and gate.admit() == 0
    assert not gate.can_admit()
    gate.set_trainer_step(1)
    assert not gate.can_admit(), "capacity for version 0 is used up"
    gate.set_trainer_step(2)
    assert not gate.can_admit(), "sampler two steps behind"
    gate.set_sampler_version(1)
    assert gate.can_admit()
    gate.give_back()
    assert gate.admitted == 1


def test_gate_validates() -> None:
    with pytest.raises(ValueError, match="max_steps_off_policy"):
        StalenessGate(bound=-1, groups_per_step=1)
    gate = StalenessGate(bound=0, groups_per_step=1)
    gate.set_trainer_step(2)
    with pytest.raises(ValueError, match="backwards"):
        gate.set_trainer_step(1)
    with pytest.raises(RuntimeError, match="admission refused"):
        gate.admit()


def test_group_advantages() -> None:
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    adv = group_advantages([2.0, 0.0], normalize_std=True)
    assert adv[0] == pytest.approx(1.0, rel=1e-4) and adv[1] == pytest.approx(-1.0, rel=1e-4)
    assert group_advantages([0.3, 0.3, 0.3]) == [0.0, 0.0, 0.0]
    assert is_constant([0.3, 0.3]) and not is_constant([0.3, 0.4])


def test_periodic_due() -> None:
    assert [s for s in range(0, 10) if due(s, 3)] == [3, 6, 9]
    assert not any(due(s, 0) for s in range(10))


def test_cursor_epochs_and_give_back() -> None:
    c = DataCursor(3, epochs=2)
    got = [c.next() for _ in range(4)]
    assert got == [0, 1, 2, 3]
    c.give_back(1)
    assert c.next() == 1, "a given-back position is re-issued first"
    c.mark_trained([0, 1, 2])
    with pytest.raises(ValueError, match="not handed out"):
        c.mark_trained([0])
    assert [c.next(), c.next(), c.next()] == [4, 5, None]
    c.mark_trained([3, 4, 5])
    assert c.exhausted


def test_cursor_can_issue_and_outstanding() -> None:
    # What the batch assembler's end-of-data check reads: nothing left to hand out, and how many
    # handed-out positions are still untrained.
    c = DataCursor(2, epochs=1)
    assert c.can_issue() and c.outstanding == 0
    a, b = c.next(), c.next()
    assert not c.can_issue() and c.outstanding == 2
    c.give_back(b)
    assert c.can_issue() and c.outstanding == 1, "a given-back position can be issued again"
    assert c.next() == b
    c.mark_trained([a, b])
    assert not c.can_issue() and c.outstanding == 0 and c.exhausted
    assert DataCursor(2, epochs=None).can_issue()


def test_cursor_state_redoes_untrained(tmp_path) -> None:
    c = DataCursor(10, epochs=None, seed=7)
    issued = [c.next() for _ in range(6)]
    c.mark_trained(issued[:3])
    c.save(tmp_path / "cursor.json", extra={"step": 3})
    resumed, extra = DataCursor.load(tmp_path / "cursor.json")
    assert extra == {"step": 3}
    again = [resumed.next() for _ in range(4)]
    assert again == [3, 4, 5, 6]
    # seeded shuffle: a permutation per epoch, identical after reload
    assert sorted(c.index(p) for p in range(10)) == list(range(10))
    assert [c.index(p) for p in range(10, 20)] == [resumed.index(p) for p in range(10, 20)]


def test_version_registry_memory_is_bounded() -> None:
    from firetitan.runtime.versions import KEEP_VERSIONS, PolicyVersionRegistry

    reg = PolicyVersionRegistry("base")
    for v in range(1, KEEP_VERSIONS + 50):
        reg.publish(v, f"snap-{v}")
    assert len(reg.history) == KEEP_VERSIONS and reg.history[-1].version == KEEP_VERSIONS + 49
    assert reg.version_of(f"snap-{KEEP_VERSIONS + 49}") == KEEP_VERSIONS + 49
    assert reg.version_of("snap-1") is None and reg.version_of("base") is None  # the oldest are forgotten
