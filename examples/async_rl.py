"""Async RL example: the GRPO task with sampling one step ahead of training (max_steps_off_policy=1).

    HF_HUB_OFFLINE=1 .venv/bin/python examples/async_rl.py --log-dir runs/async_rl --steps 20
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.grpo import parse, run_example

if __name__ == "__main__":
    run_example("async_rl", parse(__doc__))
