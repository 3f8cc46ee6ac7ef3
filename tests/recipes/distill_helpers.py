"""A trained teacher for the distillation tests: a built-in model fine-tuned to play the lookup task's toy format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from firetitan.envs import LookupEnv, lookup_rows
from firetitan.models import load_tokenizer
from firetitan.recipes import SFTConfig, sft
from firetitan.recipes.config import stable_job_id
from firetitan.runtime.trajectory import ChatMLRenderer


def teacher_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Two rows per episode: the opening -> a vowel word (the lookup call), the tool's answer -> the code word."""
    tok = load_tokenizer("firetitan/nano-qwen3")
    render = ChatMLRenderer(tok)
    out = []
    for row in lookup_rows(n, seed=seed):
        env = LookupEnv(row)
        opening = [{"role": "system", "content": env.system_prompt()}, {"role": "user", "content": row["prompt"]}]
        first = tok.decode(render.render(opening, add_generation_prompt=True))
        out.append({"prompt": first, "completion": "apple"})
        second = tok.decode(render.render([*opening, {"role": "assistant", "content": "apple"},
                                           {"role": "tool", "content": f"{row['key']}: {row['answer']}"}],
                                          add_generation_prompt=True))
        out.append({"prompt": second, "completion": row["answer"]})
    return out


async def train_teacher(log_dir: Path, home: Path | None, *, model: str = "firetitan/nano-qwen3", steps: int = 15,
                        learning_rate: float = 3e-3) -> tuple[str, str]:
    """Fine-tune `model` on `teacher_rows`; returns (train state, trainer job id) for the teacher to load."""
    cfg = SFTConfig(log_dir=log_dir, base_model=model, steps=steps, batch_size=8, epochs=4,
                    learning_rate=learning_rate, eval_every=0, save_every=0,
                    service_kwargs={"home": str(home)} if home else {})
    await sft(cfg, teacher_rows(64, seed=0))
    recs: list[dict[str, Any]] = [json.loads(line) for line in (log_dir / "checkpoints.jsonl").read_text().splitlines()]
    return str(recs[-1]["state_path"]), stable_job_id("sft", log_dir)


async def train_rl_teacher(log_dir: Path, home: Path | None, *, steps: int = 30, groups_per_step: int = 4,
                           group_size: int = 8) -> tuple[str, str]:
    """An IGPO-trained nano-qwen3 on the lookup env: it calls the tool more often than a fresh student.

    Its shift is over whole token classes (vowel-initial first words) that a random-init student
    samples often, so on-policy samples see where the teacher disagrees (an SFT teacher that prefers a
    handful of tokens the student never samples gives on-policy distillation nothing to follow).
    """
    from firetitan.envs import LookupEnv
    from firetitan.recipes.igpo import IGPOConfig, igpo

    cfg = IGPOConfig(log_dir=log_dir, steps=steps, groups_per_step=groups_per_step, group_size=group_size,
                     max_tokens=4, max_turns=3,
                     learning_rate=1e-2, eval_every=0, save_every=0, service_kwargs={"home": str(home)} if home else {})
    await igpo(cfg, lookup_rows(400, seed=0), [], LookupEnv)
    recs = [json.loads(line) for line in (log_dir / "checkpoints.jsonl").read_text().splitlines()]
    return str(recs[-1]["state_path"]), stable_job_id("igpo", log_dir)
