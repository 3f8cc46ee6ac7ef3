"""SFT warm start for multi-turn RL: fine-tune a model on token-exact demonstration episodes, return its train state.

Real RL starts from a policy that can already do the task a little. A random-init built-in model
cannot tell the lookup turn from the answer turn (docs/multiturn-rl.md), so IGPO and distillation
can start from a short SFT on correct demonstrations (`firetitan.envs.demos`): pass the returned
`(state, job)` as `init_state=state, trainer_job_id=job` (train states are per trainer job).
Resumable like any SFT run: a second call with the same `log_dir` and `steps` trains nothing more.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from firetitan.envs.demos import lookup_demonstrations
from firetitan.envs.lookup import CallFormat
from firetitan.models import load_tokenizer
from firetitan.recipes.config import stable_job_id
from firetitan.recipes.sft import SFTConfig, sft


async def lookup_warm_start(log_dir: Path, *, base_model: str = "firetitan/nano-qwen3", steps: int = 8,
                            learning_rate: float = 3e-3, batch_size: int = 8, episodes: int = 64, seed: int = 0,
                            call_format: CallFormat = "initial", max_turns: int = 3,
                            service_kwargs: dict[str, Any] | None = None) -> tuple[str, str]:
    """SFT `base_model` for `steps` on `episodes` LookupEnv demonstrations; returns (train state, trainer job id)."""
    tok = load_tokenizer(base_model)
    demos = await lookup_demonstrations(episodes, tok, seed=seed, call_format=call_format, max_turns=max_turns)
    rows = [{"tokens": d.tokens, "mask": d.mask} for d in demos]
    epochs = -(-steps * batch_size // len(rows))  # enough passes over the demonstrations for `steps`
    cfg = SFTConfig(log_dir=log_dir, base_model=base_model, steps=steps, batch_size=batch_size, epochs=epochs,
                    learning_rate=learning_rate, eval_every=0, save_every=0, seed=seed,
                    service_kwargs=service_kwargs or {})
    await sft(cfg, rows)
    recs = [json.loads(line) for line in (log_dir / "checkpoints.jsonl").read_text().splitlines()]
    return str(recs[-1]["state_path"]), stable_job_id("sft", log_dir)
