"""The decode-path chooser: alternate, then keep the path with the faster best step, per batch-size bucket."""

import pytest

from firetitan.server.deployment.engine.path_choice import MODULES, PREPARED, DecodePathChooser


def _feed(chooser: DecodePathChooser, batch: int, seconds: dict[str, list[float]]) -> list[str]:
    picked = []
    queues = {path: list(times) for path, times in seconds.items()}
    while chooser.chosen.get(chooser.bucket(batch)) is None:
        path = chooser.pick(batch)
        picked.append(path)
        chooser.record(batch, path, queues[path].pop(0))
    return picked


def test_buckets_are_powers_of_two() -> None:
    assert [DecodePathChooser.bucket(b) for b in (1, 2, 3, 4, 7, 8, 64, 65)] == [1, 2, 2, 3, 3, 4, 7, 7]


def test_the_best_step_decides_so_one_slow_outlier_does_not() -> None:
    chooser = DecodePathChooser(trials=3)
    # Prepared is faster (20 ms) but one of its steps was held up by another process (90 ms).
    picked = _feed(chooser, 16, {PREPARED: [0.090, 0.020, 0.021], MODULES: [0.030, 0.031, 0.029]})
    assert picked == [PREPARED, MODULES] * 3
    assert chooser.chosen == {chooser.bucket(16): PREPARED}
    assert chooser.pick(17) == PREPARED  # same bucket


def test_a_decided_bucket_stays_decided_and_others_start_fresh() -> None:
    chooser = DecodePathChooser(trials=2)
    _feed(chooser, 1, {PREPARED: [0.04, 0.04], MODULES: [0.03, 0.03]})
    chooser.record(1, PREPARED, 0.001)  # a late fast step does not reopen the choice
    assert chooser.pick(1) == MODULES
    assert chooser.pick(4) == PREPARED  # a new bucket starts its own trials, prepared first
    chooser.record(4, PREPARED, 0.01)
    assert chooser.pick(4) == MODULES


def test_trials_must_be_positive() -> None:
    with pytest.raises(ValueError, match="trials"):
        DecodePathChooser(trials=0)
