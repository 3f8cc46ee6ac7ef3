"""SFT example: teach a tiny random-init Qwen3 single-digit addition; eval NLL goes down, answer prob up.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/sft.py --log-dir runs/sft --steps 30
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
from firetitan.recipes import SFTConfig, sft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log-dir", type=Path, default=Path("runs/sft"))
    ap.add_argument("--model", default="firetitan/nano-qwen3")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--home", default=None, help="firetitan state directory (local services)")
    args = ap.parse_args()
    cfg = SFTConfig(log_dir=args.log_dir, base_model=args.model, steps=args.steps, batch_size=8,
                    learning_rate=3e-3, epochs=10, eval_every=10, save_every=10,
                    service_kwargs={"home": args.home} if args.home else {})
    train, evalset = arithmetic.sft_rows(200, seed=0), arithmetic.sft_rows(16, seed=1)

    async def run() -> dict:
        with progress_bar("sft", ("loss", "eval_nll")) as on_progress:
            return await sft(cfg, train, evalset, on_progress=on_progress)

    summary = anyio.run(run)
    evals = summary["evals"]
    print(json.dumps({"eval_nll_first": evals[0]["eval_nll"], "eval_nll_last": evals[-1]["eval_nll"],
                      "eval_completion_prob_last": evals[-1]["eval_completion_prob"],
                      "plot": summary["plot"]}, indent=2))


if __name__ == "__main__":
    main()
