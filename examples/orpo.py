"""ORPO example (no reference model): prefer digit answers; held-out preference accuracy goes up.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/orpo.py --log-dir runs/orpo --steps 20
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.tasks.preference_example import run_preference_example
from firetitan.recipes import ORPOConfig, orpo

if __name__ == "__main__":
    run_preference_example("orpo", __doc__.splitlines()[0], ORPOConfig, orpo)
