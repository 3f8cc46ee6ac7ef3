"""The shared CLI of the preference examples (DPO, ORPO): digit answers preferred over spelled-out ones."""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from examples.tasks import arithmetic
from examples.tasks.progress import progress_bar


def run_preference_example(name: str, description: str, make_config: Callable[..., Any],
                           recipe: Callable[..., Awaitable[dict[str, Any]]], **recipe_settings: Any) -> None:
    """Parse the common flags, run `recipe` with `make_config(...)` on the arithmetic preference rows
    and print the held-out preference accuracy and margin, first and last eval."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--log-dir", type=Path, default=Path(f"runs/{name}"))
    ap.add_argument("--model", default="firetitan/nano-qwen3")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--home", default=None, help="firetitan state directory (local services)")
    args = ap.parse_args()
    cfg = make_config(log_dir=args.log_dir, base_model=args.model, steps=args.steps, batch_size=4, epochs=5,
                      learning_rate=1e-3, eval_every=5, save_every=10,
                      service_kwargs={"home": args.home} if args.home else {}, **recipe_settings)
    train, evalset = arithmetic.preference_rows(100, seed=0), arithmetic.preference_rows(16, seed=1)

    async def run() -> dict[str, Any]:
        with progress_bar(name, (f"{name}_loss", "eval_pref_accuracy")) as on_progress:
            return await recipe(cfg, train, evalset, on_progress=on_progress)

    summary = anyio.run(run)
    first, last = summary["evals"][0], summary["evals"][-1]
    print(json.dumps({"eval_pref_accuracy": [first["eval_pref_accuracy"], last["eval_pref_accuracy"]],
                      "eval_margin": [first["eval_margin"], last["eval_margin"]], "plot": summary["plot"]}, indent=2))
