"""The configuration every recipe shares (pydantic, validated before anything starts)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RecipeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    log_dir: Path = Field(description="run directory: metrics.jsonl, checkpoints.jsonl, cursor files, plot")
    base_model: str = "firetitan/nano-qwen3"
    lora_rank: int = Field(default=0, ge=0)
    learning_rate: float = Field(default=1e-3, gt=0)
    steps: int = Field(default=20, ge=1, description="optimizer steps to reach (counting resumed ones)")
    save_every: int = Field(default=10, ge=0, description="train state + data cursor every N steps (0 = only at the end)")
    eval_every: int = Field(default=5, ge=0, description="evaluation every N steps (0 = only at start and end)")
    resume: bool = Field(default=True, description="continue from the last train state in log_dir, if any")
    seed: int = 0
    timeout_s: float = Field(default=600.0, gt=0, description="deadline of every remote call")
    max_in_flight: int = Field(default=2, ge=1, description="training steps queued on the trainer at once")
    trainer_job_id: str | None = Field(
        default=None, description="trainer job to create or reattach; default: a stable id derived from log_dir, "
        "so a resumed run gets the same job and therefore finds its train states")
    service_kwargs: dict[str, Any] = Field(default_factory=dict,
                                           description="extra FiretitanServiceClient.from_firetitan_config arguments")


def stable_job_id(name: str, log_dir: Path) -> str:
    """A resource id that is the same every time this run directory is used (resume reattaches)."""
    digest = hashlib.sha256(str(Path(log_dir).resolve()).encode()).hexdigest()[:10]
    return f"{name.replace('_', '-')}-{digest}"
