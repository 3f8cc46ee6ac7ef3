"""IGPO vs GRPO on the built-in multi-turn lookup environment: success per step and per sampled token.

Same model, environment, batch (groups x group size x turns x tokens), learning rate and number of
steps; the only difference is the advantage (IGPO: information gain + outcome per turn; GRPO: the
group-normalised outcome on every turn). Each seed runs both modes back to back (alternating which
goes first) against one local control plane. Writes benchmarks/results/igpo_vs_grpo.json with each
run's curves and the mean and spread (std over seeds) of every summary number.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/igpo_vs_grpo.py --steps 40 --seeds 0 1 2 [--home DIR]
    # from an SFT warm start (64 steps on demonstrations, one per seed, shared by both modes):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/igpo_vs_grpo.py --warm-start-steps 64 --steps 20 --groups 8 --lr 3e-3 \
        --out benchmarks/results/igpo_vs_grpo_warm.json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from firetitan.envs import LookupEnv, lookup_rows  # noqa: E402
from firetitan.recipes.igpo import IGPOConfig, igpo  # noqa: E402
from firetitan.recipes.warm_start import lookup_warm_start  # noqa: E402


def run_one(mode: str, seed: int, args: argparse.Namespace, out: Path, init: dict[str, str]) -> dict[str, Any]:
    log_dir, steps, home = out / f"{mode}-seed{seed}", args.steps, args.home
    cfg = IGPOConfig(log_dir=log_dir, base_model=args.model, advantage=mode, steps=steps, seed=seed,
                     groups_per_step=args.groups, group_size=8, max_tokens=4, max_turns=3, learning_rate=args.lr,
                     eval_every=0, save_every=0, resume=False, service_kwargs={"home": home} if home else {}, **init)
    started = time.monotonic()
    summary = anyio.run(lambda: igpo(cfg, lookup_rows(400, seed=seed), lookup_rows(16, seed=1, split="eval"),
                                     lambda row: LookupEnv(row, max_turns=3)))
    recs = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    eps = [r for r in recs if r["event"] == "episodes"]
    success = [r["success"] for r in eps]
    tokens = [r["sampled_tokens_total"] for r in eps]
    k = max(1, steps // 4)
    return {"mode": mode, "seed": seed, "wall_s": round(time.monotonic() - started, 2), "success": success,
            "sampled_tokens_total": tokens, "turns": [r["turns"] for r in eps],
            "success_first_quarter": sum(success[:k]) / k, "success_last_quarter": sum(success[-k:]) / k,
            "success_mean": sum(success) / len(success),
            # successes per 1000 sampled tokens over the whole run (cost-normalised learning)
            "successes_per_1k_tokens": 1000 * sum(s * args.groups * 8 for s in success) / tokens[-1],
            "eval_success": [e["eval_success"] for e in summary["evals"]]}


def spread(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    xs = [r[key] for r in runs]
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--model", default="firetitan/nano-qwen3")
    ap.add_argument("--home", default=None)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--groups", type=int, default=4, help="groups of 8 episodes per step")
    ap.add_argument("--warm-start-steps", type=int, default=0, help="SFT warm start on demonstrations first (lr 1e-2)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "igpo_vs_grpo.json")
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="igpo-bench-") as tmp:
        for i, seed in enumerate(args.seeds):
            init: dict[str, str] = {}
            if args.warm_start_steps > 0:
                warm = functools.partial(lookup_warm_start, Path(tmp) / f"warm-seed{seed}", base_model=args.model,
                                         steps=args.warm_start_steps, learning_rate=1e-2, seed=seed,
                                         service_kwargs={"home": args.home} if args.home else {})
                state, job = anyio.run(warm)
                init = {"init_state": state, "trainer_job_id": job}
            for mode in (("igpo", "outcome") if i % 2 == 0 else ("outcome", "igpo")):
                runs.append(run_one(mode, seed, args, Path(tmp), init))
                print(json.dumps({k: v for k, v in runs[-1].items() if not isinstance(v, list)}), flush=True)
    keys = ("success_first_quarter", "success_last_quarter", "success_mean", "successes_per_1k_tokens")
    result = {"benchmark": "igpo_vs_grpo", "model": args.model, "steps": args.steps, "seeds": args.seeds,
              "batch": f"{args.groups} groups x 8 episodes, <= 3 turns x 4 tokens, lr {args.lr:g}, cispo",
              "warm_start_steps": args.warm_start_steps,
              "host": platform.node(), "python": platform.python_version(),
              "summary": {mode: {k: spread([r for r in runs if r["mode"] == mode], k) for k in keys}
                          for mode in ("igpo", "outcome")},
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
