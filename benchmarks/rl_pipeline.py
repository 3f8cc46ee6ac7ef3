"""Async RL (max_steps_off_policy=1) vs on-policy GRPO: wall time per step, reward, idle ratios.

Both runs use the same task, model, seed, batch shape and number of steps, one after the other in
this command, against the same local control plane. Writes benchmarks/results/rl_pipeline.json.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/rl_pipeline.py --steps 16 --repeats 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from examples.tasks import vowels  # noqa: E402
from firetitan.recipes import AsyncRLConfig, GRPOConfig, async_rl, grpo  # noqa: E402
from firetitan.server.control_plane.home import resolve_home  # noqa: E402
from firetitan.server.process import spawn_worker  # noqa: E402


class WorkerCPU:
    """Polls the CPU seconds of this home's trainer/deployment processes (they exit at close, so poll)."""

    def __init__(self, home: Path) -> None:
        self.home = str(home)
        self.seen: dict[int, float] = {}
        self.threads: dict[str, int] = {}  # torch threads each worker was started with (--threads)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            for p in psutil.process_iter(["cmdline", "cpu_times"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if self.home in cmd and "control_plane" not in cmd and p.info["cpu_times"]:
                    t = p.info["cpu_times"]
                    args = p.info["cmdline"] or []
                    role = "trainer" if "firetitan.server.trainer" in cmd else "deployment"
                    if "--threads" in args:
                        self.threads[role] = int(args[args.index("--threads") + 1])
                    self.seen[p.pid] = max(self.seen.get(p.pid, 0.0), t.user + t.system)

    def __enter__(self) -> WorkerCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        return sum(self.seen.values())


def per_step(log_dir: Path) -> dict[str, Any]:
    recs = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["event"] == "train_step"]
    # Steady state: from the first step's end to the last's, so provisioning and the initial sync
    # (identical in both modes) do not dilute the per-step time.
    t = [r["t"] for r in steps]
    rewards = [r["reward"] for r in steps if r.get("reward") is not None]
    third = max(1, len(rewards) // 3)
    return {"phases": phases(recs), "steps": len(steps), "sec_per_step": (t[-1] - t[0]) / (len(t) - 1),
            "reward_mean": sum(rewards) / len(rewards), "reward_first_third": sum(rewards[:third]) / third,
            "reward_last_third": sum(rewards[-third:]) / third, "rewards": [round(r, 4) for r in rewards],
            "reward_by_version": reward_by_version(recs)}


def reward_by_version(recs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean rollout reward of each policy version (weights after that many optimizer steps), over the
    groups that were trained on. A step's batch in async RL was sampled by an older version, so
    reward per *step* lags by up to the bound; per version it measures what each update achieved."""
    trained = {p for r in recs if r["event"] == "train_step" for p in r.get("positions") or ()}
    by: dict[int, list[float]] = {}
    for r in recs:
        if r["event"] == "rollout" and r.get("reward") is not None and r["position"] in trained:
            by.setdefault(int(r["version"]), []).append(float(r["reward"]))
    return {str(v): sum(xs) / len(xs) for v, xs in sorted(by.items())}


def common_version_means(a: dict[str, float], b: dict[str, float]) -> tuple[float, float]:
    """Mean reward over the policy versions both runs sampled with (each version weighs the same)."""
    common = sorted(set(a) & set(b), key=int)
    return sum(a[v] for v in common) / len(common), sum(b[v] for v in common) / len(common)


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def phases(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean phase timings from metrics.jsonl: where each mode spends (or waits out) a step."""
    steps = [r for r in recs if r["event"] == "train_step"][1:]  # steady state, as sec_per_step
    syncs = [r for r in recs if r["event"] == "weight_sync"]
    return {
        "wait_for_data_s": _mean([r["wait_for_data_s"] for r in steps]),
        # submit -> result awaited; the pipeline awaits late on purpose, so this is not trainer compute
        "train_latency_s": _mean([r["latency_s"] for r in recs if r["event"] == "train_result"]),
        "rollout_group_s": _mean([r["sample_s"] for r in recs if r["event"] == "rollout"]),
        "snapshot_s": _mean([r["snapshot_s"] for r in syncs if r.get("snapshot_s") is not None]),
        "hot_load_s": _mean([r["hot_load_s"] for r in syncs]),
    }


async def run_mode(mode: str, args: argparse.Namespace, home: Path, out_dir: Path, cp_pid: int,
                   seed: int = 0) -> dict[str, Any]:
    common = dict(log_dir=out_dir / mode, base_model=args.model, steps=args.steps, groups_per_step=args.groups,
                  group_size=args.group_size, max_tokens=args.max_tokens, learning_rate=args.lr, seed=seed, loss_fn=args.loss_fn,
                  eval_every=0, save_every=0, resume=False, max_concurrent_rollouts=args.groups * 2,
                  service_kwargs={"home": str(home)})
    rows, evalset = vowels.rl_rows(200, seed=0), vowels.rl_rows(16, seed=1)
    started = time.monotonic()
    me = psutil.Process()
    client_before = sum(me.cpu_times()[:2])
    cp = psutil.Process(cp_pid)  # the gateway: trainer calls and hot-loads go through it (rollouts go to the replica)
    cp_before = sum(cp.cpu_times()[:2])
    with WorkerCPU(home) as cpu:
        if mode == "grpo":
            summary = await grpo(GRPOConfig(**common), rows, evalset, vowels.reward)
        else:
            summary = await async_rl(AsyncRLConfig(max_steps_off_policy=1, **common), rows, evalset, vowels.reward)
    wall = time.monotonic() - started
    client_cpu = sum(me.cpu_times()[:2]) - client_before
    cp_cpu = sum(cp.cpu_times()[:2]) - cp_before
    return {"mode": mode, "seed": seed, "command_wall_s": wall, **per_step(out_dir / mode),
            # worker CPU seconds over the whole mode (provisioning included) per wall second: how many
            # cores the trainer + deployment actually got; near the free cores means CPU-bound
            "worker_cpu_s": cpu.cpu_s, "worker_cores_used": cpu.cpu_s / wall,
            "client_cpu_s": client_cpu, "client_cores_used": client_cpu / wall,
            "control_plane_cpu_s": cp_cpu, "control_plane_cores_used": cp_cpu / wall, "worker_threads": cpu.threads,
            "eval_reward_first": summary["evals"][0]["eval_reward"], "eval_reward_last": summary["evals"][-1]["eval_reward"],
            "trainer_idle_ratio": summary["trainer_idle_ratio"], "sampler_idle_ratio": summary["sampler_idle_ratio"],
            "staleness": summary["staleness"]}


def _means(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Means over repeats of the numbers the headline ratios use."""
    return {k: sum(r[k] for r in runs) / len(runs) for k in ("sec_per_step", "reward_mean")}


def _version_reward_ratio(pairs: list[dict[str, Any]]) -> float:
    """async / grpo of the reward by policy version, summed over pairs (versions both modes sampled)."""
    sums = [common_version_means(p["async_rl"]["reward_by_version"], p["grpo"]["reward_by_version"]) for p in pairs]
    return sum(a for a, _ in sums) / sum(g for _, g in sums)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="firetitan/nano-qwen3")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--loss-fn", default="cispo", choices=["ppo", "importance_sampling", "cispo"],
                    help="the RL loss of both modes (on-policy, cispo's gradient equals ppo's)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rl_pipeline.json")
    ap.add_argument("--keep", type=Path, default=None, help="copy both runs' log dirs (metrics.jsonl) here")
    ap.add_argument("--repeats", type=int, default=1,
                    help="pairs to run (seed 0, 1, ...; the order alternates so neither mode always goes first)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="ft-bench-rl-") as tmp:
        home = Path(tmp) / "home"
        layout = resolve_home(home).ensure()
        cp = spawn_worker("firetitan.server.control_plane", ["--home", str(home)],
                          log_path=layout.logs / "control_plane.log", ready_timeout=180)
        pairs: list[dict[str, Any]] = []
        try:
            for r in range(args.repeats):
                order = ("grpo", "async_rl") if r % 2 == 0 else ("async_rl", "grpo")
                pair = {m: anyio.run(run_mode, m, args, home, Path(tmp) / f"runs{r}", cp.pid, r) for m in order}
                pairs.append({"grpo": pair["grpo"], "async_rl": pair["async_rl"], "order": list(order)})
        finally:
            cp.stop(60)
            if args.keep:
                for r in range(len(pairs)):
                    shutil.copytree(Path(tmp) / f"runs{r}", args.keep / f"runs{r}", dirs_exist_ok=True)
    results = {"grpo": pairs[0]["grpo"], "async_rl": pairs[0]["async_rl"]}
    g, a = (_means([p[m] for p in pairs]) for m in ("grpo", "async_rl"))
    report = {
        "benchmark": "rl_pipeline", "model": args.model, "steps": args.steps, "groups_per_step": args.groups,
        "group_size": args.group_size, "max_tokens": args.max_tokens, "loss_fn": args.loss_fn, "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
        "speedup_sec_per_step": g["sec_per_step"] / a["sec_per_step"],
        # Reward of the batches each trainer step consumed: lags one step in async (bound 1) by design.
        "reward_mean_ratio_async_over_grpo": (a["reward_mean"] / g["reward_mean"]) if g["reward_mean"] else None,
        # Reward of each policy version's own samples, on the versions both modes sampled with.
        "reward_by_version_ratio_async_over_grpo": _version_reward_ratio(pairs),
        "goal": "async >= 1.5x faster per step with reward per step no worse",
        "repeats": len(pairs),
        # each pair ran back to back on the same machine state: its ratios are the fair comparisons
        "pairs": [{"seed": p["grpo"]["seed"], "order": p["order"],
                   "speedup_sec_per_step": p["grpo"]["sec_per_step"] / p["async_rl"]["sec_per_step"],
                   "reward_mean_ratio_async_over_grpo": p["async_rl"]["reward_mean"] / p["grpo"]["reward_mean"],
                   "reward_by_version_ratio_async_over_grpo": _version_reward_ratio([p]),
                   "sec_per_step": {m: p[m]["sec_per_step"] for m in ("grpo", "async_rl")},
                   "reward_mean": {m: p[m]["reward_mean"] for m in ("grpo", "async_rl")}} for p in pairs],
        "results": results,
        "all_results": pairs[1:],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))
    for m in ("grpo", "async_rl"):
        r = results[m]  # the first pair; all pairs are in the JSON
        print(m, {k: r[k] for k in ("sec_per_step", "reward_mean", "reward_last_third", "eval_reward_last",
                                    "trainer_idle_ratio", "sampler_idle_ratio", "worker_cores_used",
                                    "client_cores_used", "control_plane_cores_used", "worker_threads", "phases")})


if __name__ == "__main__":
    main()
