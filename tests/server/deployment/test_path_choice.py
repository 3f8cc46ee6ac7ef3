"""The decode-path chooser: alternate, then keep the path with the faster best step, per key."""

import pytest

from firetitan.server.deployment.engine.path_choice import MODULES, PACKED, PREPARED, DecodePathChooser

BOTH = (PREPARED, MODULES)


def _feed(chooser: DecodePathChooser, key: object, paths: tuple[str, ...], seconds: dict[str, list[float]]
          ) -> list[str]:
    picked = []
    queues = {path: list(times) for path, times in seconds.items()}
    while chooser.chosen.get(key) is None:
        path = chooser.pick(key, paths)
        picked.append(path)
        chooser.record(key, path, queues[path].pop(0))
    return picked


def test_buckets_are_powers_of_two_and_exact_keys_are_their_own() -> None:
    assert [DecodePathChooser.bucket(b)[1] for b in (1, 2, 3, 4, 7, 8, 64, 65)] == [1, 2, 2, 3, 3, 4, 7, 7]
    assert DecodePathChooser.exact(64) != DecodePathChooser.bucket(64)
    assert DecodePathChooser.exact(64) != DecodePathChooser.exact(65)


def test_the_best_step_decides_so_one_slow_outlier_does_not() -> None:
    chooser = DecodePathChooser(trials=3)
    key = chooser.bucket(16)
    # Prepared is faster (20 ms) but one of its steps was held up by another process (90 ms).
    picked = _feed(chooser, key, BOTH, {PREPARED: [0.090, 0.020, 0.021], MODULES: [0.030, 0.031, 0.029]})
    assert picked == [PREPARED, MODULES] * 3
    assert chooser.chosen == {key: PREPARED}
    assert chooser.pick(chooser.bucket(17), BOTH) == PREPARED  # same bucket


def test_record_reports_the_decision_once() -> None:
    chooser = DecodePathChooser(trials=1)
    key = chooser.exact(8)
    assert chooser.record(key, PACKED, 0.01) is None  # never picked under this key: nothing to time
    assert chooser.pick(key, (PACKED, MODULES)) == PACKED
    assert chooser.record(key, PACKED, 0.02) is None  # modules has no timing yet
    assert chooser.pick(key, (PACKED, MODULES)) == MODULES
    assert chooser.record(key, MODULES, 0.01) == MODULES
    assert chooser.record(key, PACKED, 0.001) is None  # decided: later timings change nothing
    assert chooser.chosen[key] == MODULES


def test_three_candidates_alternate_in_order_then_the_fastest_wins() -> None:
    chooser = DecodePathChooser(trials=2)
    key = chooser.exact(64)
    paths = (PREPARED, MODULES, PACKED)
    picked = _feed(chooser, key, paths, {PACKED: [0.11, 0.12], PREPARED: [0.14, 0.13], MODULES: [0.15, 0.14]})
    assert picked == list(paths) * 2
    assert chooser.chosen[key] == PACKED


def test_a_decided_bucket_stays_decided_and_others_start_fresh() -> None:
    chooser = DecodePathChooser(trials=2)
    _feed(chooser, chooser.bucket(1), BOTH, {PREPARED: [0.04, 0.04], MODULES: [0.03, 0.03]})
    chooser.record(chooser.bucket(1), PREPARED, 0.001)  # a late fast step does not reopen the choice
    assert chooser.pick(chooser.bucket(1), BOTH) == MODULES
    four = chooser.bucket(4)
    assert chooser.pick(four, BOTH) == PREPARED  # a new bucket starts its own trials, prepared first
    chooser.record(four, PREPARED, 0.01)
    assert chooser.pick(four, BOTH) == MODULES


def test_trials_must_be_positive() -> None:
    with pytest.raises(ValueError, match="trials"):
        DecodePathChooser(trials=0)
