"""Pure admission rules for `max_steps_off_policy`: who may start a rollout and who may be trained on.

Versions count optimizer steps: policy version `v` is the weights after `v` steps, and the trainer at
step `s` (steps submitted so far) trains its next batch on version-`s` weights. A sample produced by
version `v` and trained at step `s` is `s - v` steps off-policy; `bound = 0` is strictly on-policy.
"""

from __future__ import annotations

from dataclasses import dataclass


def staleness(trainer_step: int, version: int) -> int:
    """How many optimizer steps separate the sampling policy from the trainer's current weights."""
    return trainer_step - version


def may_start(trainer_step: int, sampler_version: int, bound: int) -> bool:
    """A rollout may start only while the sampler is at most `bound` steps behind the trainer."""
    return staleness(trainer_step, sampler_version) <= bound


def is_trainable(trainer_step: int, version: int, bound: int) -> bool:
    """A sample may be trained on only if it is still within the bound when the trainer consumes it."""
    return 0 <= staleness(trainer_step, version) <= bound


@dataclass
class StalenessGate:
    """Counts admitted groups and decides admission under the bound.

    Beyond the hard rule (`may_start`), admission is paced by capacity: with FIFO consumption the
    `i`-th admitted group is trained at step `i // groups_per_step`, so admitting only while
    `admitted < (sampler_version + bound + 1) * groups_per_step` keeps nearly every sample fresh at
    consumption instead of producing work that would be dropped. The consumer still checks
    `is_trainable`, which is what makes the bound hard.
    """

    bound: int
    groups_per_step: int
    trainer_step: int = 0
    sampler_version: int = 0
    admitted: int = 0  # groups admitted and not given back (in flight, buffered, or trained)

    def __post_init__(self) -> None:
        if self.bound < 0:
            raise ValueError(f"max_steps_off_policy: must be >= 0, got {self.bound}")
        if self.groups_per_step < 1:
            raise ValueError(f"groups_per_step: must be >= 1, got {self.groups_per_step}")

    @property
    def capacity(self) -> int:
        return (self.sampler_version + self.bound + 1) * self.groups_per_step

    def can_admit(self) -> bool:
        return may_start(self.trainer_step, self.sampler_version, self.bound) and self.admitted < self.capacity

    def admit(self) -> int:
        """Take one slot; returns the sampler version the rollout is admitted under."""
        if not self.can_admit():
            raise RuntimeError(
                f"admission refused: trainer_step={self.trainer_step} sampler_version={self.sampler_version} "
                f"admitted={self.admitted} capacity={self.capacity} bound={self.bound}"
            )
        self.admitted += 1
        return self.sampler_version

    def give_back(self) -> None:
        """Return a slot whose group will never be trained on (failed or dropped as stale)."""
        if self.admitted <= 0:
            raise RuntimeError("give_back: no admitted group to give back")
        self.admitted -= 1

    def set_trainer_step(self, step: int) -> None:
        if step < self.trainer_step:
            raise ValueError(f"trainer_step: must not go backwards ({self.trainer_step} -> {step})")
        self.trainer_step = step

    def set_sampler_version(self, version: int) -> None:
        if version < self.sampler_version:
            raise ValueError(f"sampler_version: must not go backwards ({self.sampler_version} -> {version})")
        self.sampler_version = version
