"""The event-loop runtime: pipelined trainer steps, periodic jobs, policy versions and bounded rollouts."""

from firetitan.runtime.advantages import group_advantages
from firetitan.runtime.cursor import DataCursor
from firetitan.runtime.periodic import Pending, PeriodicJob, PeriodicTasks
from firetitan.runtime.pipeline import StepResult, TrainerPipeline
from firetitan.runtime.remote import call
from firetitan.runtime.rl_loop import RLLoop, RLLoopSettings
from firetitan.runtime.rollouts import Admission, BatchAssembler, RolloutGroup, RolloutWorkers
from firetitan.runtime.run_metrics import BusyTracker, RunMetrics, StalenessHistogram
from firetitan.runtime.staleness import StalenessGate, is_trainable, may_start
from firetitan.runtime.versions import PolicyVersion, PolicyVersionRegistry

__all__ = [
    "Admission", "BatchAssembler", "BusyTracker", "DataCursor", "Pending", "PeriodicJob", "PeriodicTasks",
    "PolicyVersion", "PolicyVersionRegistry", "RLLoop", "RLLoopSettings", "RolloutGroup", "RolloutWorkers",
    "RunMetrics", "StalenessGate", "StalenessHistogram", "StepResult", "TrainerPipeline", "call",
    "group_advantages", "is_trainable", "may_start",
]
