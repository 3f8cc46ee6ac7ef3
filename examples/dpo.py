"""DPO example: prefer answers in digits over spelled-out ones; held-out preference accuracy goes up.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/dpo.py --log-dir runs/dpo --steps 20
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.tasks.preference_example import run_preference_example
from firetitan.recipes import DPOConfig, dpo

if __name__ == "__main__":
    run_preference_example("dpo", __doc__.splitlines()[0], DPOConfig, dpo, beta=0.1)
