"""GRPO example: on-policy RL with a dense toy reward (words that start with a vowel); reward goes up.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/grpo.py --log-dir runs/grpo --steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.tasks import vowels
from examples.tasks.progress import progress_bar
from firetitan.recipes import AsyncRLConfig, GRPOConfig, async_rl, grpo


def parse(doc: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--log-dir", type=Path, required=False)
    ap.add_argument("--model", default="firetitan/nano-qwen3")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-steps-off-policy", type=int, default=1)
    ap.add_argument("--home", default=None, help="firetitan state directory (local services)")
    return ap.parse_args()


def rl_settings(args: argparse.Namespace) -> dict:
    return dict(base_model=args.model, steps=args.steps, groups_per_step=4, group_size=8, max_tokens=6,
                learning_rate=1e-2, eval_every=5, save_every=10,
                service_kwargs={"home": args.home} if args.home else {})


def run_example(name: str, args: argparse.Namespace) -> None:
    rows, evalset = vowels.rl_rows(200, seed=0), vowels.rl_rows(16, seed=1)
    log_dir = args.log_dir or Path(f"runs/{name}")
    if name == "grpo":
        cfg = GRPOConfig(log_dir=log_dir, **rl_settings(args))
        recipe = grpo
    else:
        cfg = AsyncRLConfig(log_dir=log_dir, max_steps_off_policy=args.max_steps_off_policy, **rl_settings(args))
        recipe = async_rl

    async def run() -> dict:
        with progress_bar(name, ("reward", "eval_reward", "trainer_idle_ratio")) as on_progress:
            return await recipe(cfg, rows, evalset, vowels.reward, on_progress=on_progress)

    summary = anyio.run(run)
    steps = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [s["reward"] for s in steps if s["event"] == "train_step" and s.get("reward") is not None]
    k = max(1, len(rewards) // 4)
    print(json.dumps({"reward_first_quarter": sum(rewards[:k]) / k, "reward_last_quarter": sum(rewards[-k:]) / k,
                      "eval_reward": [summary["evals"][0]["eval_reward"], summary["evals"][-1]["eval_reward"]],
                      "trainer_idle_ratio": summary["trainer_idle_ratio"],
                      "sampler_idle_ratio": summary["sampler_idle_ratio"],
                      "staleness": summary["staleness"], "plot": summary["plot"]}, indent=2))


if __name__ == "__main__":
    run_example("grpo", parse(__doc__))
