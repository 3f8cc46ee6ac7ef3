"""ORPO example (no reference model): prefer digit answers; held-out preference accuracy goes up.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/orpo.py --log-dir runs/orpo --steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.tasks import arithmetic
from examples.tasks.progress import progress_bar
from firetitan.recipes import ORPOConfig, orpo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log-dir", type=Path, default=Path("runs/orpo"))
    ap.add_argument("--model", default="firetitan/nano-qwen3")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--home", default=None, help="firetitan state directory (local services)")
    args = ap.parse_args()
    cfg = ORPOConfig(log_dir=args.log_dir, base_model=args.model, steps=args.steps, batch_size=4, epochs=5,
                    learning_rate=1e-3, eval_every=5, save_every=10,
                    service_kwargs={"home": args.home} if args.home else {})
    train, evalset = arithmetic.preference_rows(100, seed=0), arithmetic.preference_rows(16, seed=1)

    async def run() -> dict:
        with progress_bar("orpo", ("orpo_loss", "eval_pref_accuracy")) as on_progress:
            return await orpo(cfg, train, evalset, on_progress=on_progress)

    summary = anyio.run(run)
    first, last = summary["evals"][0], summary["evals"][-1]
    print(json.dumps({"eval_pref_accuracy": [first["eval_pref_accuracy"], last["eval_pref_accuracy"]],
                      "eval_margin": [first["eval_margin"], last["eval_margin"]], "plot": summary["plot"]}, indent=2))


if __name__ == "__main__":
    main()
