"""IGPO example: multi-turn lookup-tool episodes (built-in KB), turn rewards = information gain + outcome.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/igpo.py --log-dir runs/igpo --steps 40
    HF_HUB_OFFLINE=1 .venv/bin/python examples/igpo.py --log-dir runs/igpo_async --max-steps-off-policy 1
    HF_HUB_OFFLINE=1 .venv/bin/python examples/igpo.py --advantage outcome   # GRPO on the same episodes
    HF_HUB_OFFLINE=1 .venv/bin/python examples/igpo.py --warm-start-steps 64 --lr 2e-3 --groups 8 --steps 30   # from an SFT warm start
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.tasks.progress import progress_bar
from firetitan.envs import LookupEnv, lookup_rows
from firetitan.recipes.igpo import IGPOConfig, igpo
from firetitan.recipes.warm_start import lookup_warm_start


def parse(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--log-dir", type=Path, required=False)
    ap.add_argument("--model", default="firetitan/nano-qwen3")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps-off-policy", type=int, default=0)
    ap.add_argument("--call-format", choices=["initial", "tool_call"], default="initial",
                    help="initial: the toy call rule for random-init models; tool_call: <tool_call> JSON")
    ap.add_argument("--home", default=None, help="firetitan state directory (local services)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--groups", type=int, default=4, help="groups (prompts) per step")
    ap.add_argument("--warm-start-steps", type=int, default=0,
                    help="first SFT the model this many steps on demonstration episodes (lr 1e-2) and start from it")
    return ap


async def warm_start(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """`init_state` / `trainer_job_id` of an SFT warm start in `log_dir/warm_start` (none when not asked for)."""
    if args.warm_start_steps <= 0:
        return {}
    state, job = await lookup_warm_start(log_dir / "warm_start", base_model=args.model, steps=args.warm_start_steps,
                                         learning_rate=1e-2, call_format=args.call_format,
                                         service_kwargs={"home": args.home} if args.home else {})
    return {"init_state": state, "trainer_job_id": job}


def episode_settings(args: argparse.Namespace) -> dict[str, Any]:
    return dict(base_model=args.model, steps=args.steps, seed=args.seed, groups_per_step=args.groups, group_size=8,
                max_tokens=4, max_turns=3, learning_rate=args.lr, eval_every=10, save_every=10,
                max_steps_off_policy=args.max_steps_off_policy, sync_every=1,
                service_kwargs={"home": args.home} if args.home else {})


def env_factory(args: argparse.Namespace):
    return lambda row: LookupEnv(row, call_format=args.call_format, max_turns=3)


def curve(log_dir: Path, key: str) -> list[float]:
    recs = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in recs if r["event"] == "episodes" and r.get(key) is not None]


def main() -> None:
    ap = parse(__doc__)
    ap.add_argument("--advantage", choices=["igpo", "outcome"], default="igpo")
    args = ap.parse_args()
    log_dir = args.log_dir or Path(f"runs/igpo-{args.advantage}")
    rows, evalset = lookup_rows(400, seed=args.seed), lookup_rows(16, seed=1, split="eval")

    async def run() -> dict:
        cfg = IGPOConfig(log_dir=log_dir, advantage=args.advantage, **episode_settings(args),
                         **await warm_start(args, log_dir))
        with progress_bar(f"igpo ({args.advantage})", ("success", "eval_success", "reward")) as on_progress:
            return await igpo(cfg, rows, evalset, env_factory(args), on_progress=on_progress)

    summary = anyio.run(run)
    success = curve(log_dir, "success")
    k = max(1, len(success) // 4)
    print(json.dumps({"success_first_quarter": sum(success[:k]) / k, "success_last_quarter": sum(success[-k:]) / k,
                      "eval_success": [e["eval_success"] for e in summary["evals"]],
                      "sampled_tokens": summary["sampled_tokens"], "plot": summary["plot"]}, indent=2))


if __name__ == "__main__":
    main()
