"""On-policy distillation example: nano-qwen3 (student) learns from tiny-qwen3 (teacher) on lookup episodes.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/distill.py --log-dir runs/distill --steps 30   # reverse KL ~0.04 -> ~0.01
    HF_HUB_OFFLINE=1 .venv/bin/python examples/distill.py --teacher-state <train state of a trained tiny-qwen3>
    # a better teacher: nano-qwen3 SFT'd 320 steps on demonstrations, teaching the same model SFT'd 64 steps;
    # the score is a sampled eval over every train entity 8 times (sampled success ~0.2 -> 0.31-0.40 in 16 steps)
    HF_HUB_OFFLINE=1 .venv/bin/python examples/distill.py --warm-start-steps 64 --teacher-warm-start-steps 320 \
        --lr 6e-3 --groups 32 --group-size 4 --steps 16 --sampled-eval-repeats 8
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.igpo import curve, env_factory, episode_settings, parse, warm_start
from examples.tasks.progress import progress_bar
from firetitan.envs import every_key_rows, lookup_rows
from firetitan.recipes.distill import DistillConfig, distill
from firetitan.recipes.warm_start import lookup_warm_start


def main() -> None:
    ap = parse(__doc__)
    ap.add_argument("--teacher-model", default="firetitan/tiny-qwen3")
    ap.add_argument("--teacher-state", default=None)
    ap.add_argument("--teacher-prompt", default=None, help="privileged text only the teacher sees")
    ap.add_argument("--teacher-warm-start-steps", type=int, default=0,
                    help="the teacher is --model SFT'd this many steps on demonstrations (overrides the teacher options)")
    ap.add_argument("--group-size", type=int, default=16, help="episodes per group")
    ap.add_argument("--sampled-eval-repeats", type=int, default=0,
                    help="R > 0: eval = every train entity R times, sampled at temperature 1 (a greedy first word is "
                    "often not a call; docs/multiturn-rl.md); 0: greedy on 16 held-out rows")
    ap.set_defaults(lr=1e-3, groups=16)
    args = ap.parse_args()
    log_dir = args.log_dir or Path("runs/distill")
    rows = lookup_rows(400, seed=args.seed)
    sampled = args.sampled_eval_repeats > 0
    evalset = every_key_rows(repeats=args.sampled_eval_repeats) if sampled else lookup_rows(16, seed=1, split="eval")

    async def run() -> dict:
        teacher = {"teacher_model": args.teacher_model, "teacher_state": args.teacher_state}
        if args.teacher_warm_start_steps > 0:
            state, job = await lookup_warm_start(log_dir / "teacher_warm_start", base_model=args.model,
                                                 steps=args.teacher_warm_start_steps, learning_rate=1e-2,
                                                 call_format=args.call_format,
                                                 service_kwargs={"home": args.home} if args.home else {})
            teacher = {"teacher_model": args.model, "teacher_state": state, "teacher_job_id": job}
        # on-policy distillation needs many sampled tokens per update (docs/multiturn-rl.md)
        cfg = DistillConfig(log_dir=log_dir, teacher_prompt=args.teacher_prompt, **teacher,
                            **{**episode_settings(args), "group_size": args.group_size, "max_concurrent_rollouts": 16,
                               "eval_temperature": 1.0 if sampled else 0.0},
                            **await warm_start(args, log_dir))
        with progress_bar("distill", ("reverse_kl", "success", "eval_success")) as on_progress:
            return await distill(cfg, rows, evalset, env_factory(args), on_progress=on_progress)

    summary = anyio.run(run)
    kl = curve(log_dir, "reverse_kl")
    k = max(1, len(kl) // 4)
    print(json.dumps({"reverse_kl_first_quarter": sum(kl[:k]) / k, "reverse_kl_last_quarter": sum(kl[-k:]) / k,
                      "eval_success": [e["eval_success"] for e in summary["evals"]], "plot": summary["plot"]},
                     indent=2))


if __name__ == "__main__":
    main()
