"""The seed walkthrough written against the official `fireworks.training.sdk`, pointed at firetitan.

Nothing here imports firetitan: the script is the seed's "Training and Sampling" walkthrough with
only the base URL, the key and the model names taken from the environment, so the same file runs
against api.fireworks.ai or a local firetitan control plane.

    firetitan serve --port 8700 &                    # or any running control plane
    firetitan models alias accounts/fireworks/models/qwen3-8b firetitan/nano-qwen3
    firetitan models alias accounts/fireworks/trainingShapes/qwen3-8b-128k-h200 firetitan/nano-qwen3
    export FIREWORKS_BASE_URL=http://127.0.0.1:8700
    export FIREWORKS_API_KEY=$(sed 's/^tml-/fw_/' "$FIRETITAN_HOME/api_key")   # the fw_ spelling of the key
    export TOKENIZER_MODEL=$(python -c "import firetitan.models.registry as r; print(r.TOKENIZER_DIR)")
    python examples/official_fireworks_walkthrough.py --steps 20

Task: "Which letter comes after K?" -> "L", taught with a custom SFT objective.
Set `WALKTHROUGH_RECORD=path.json` to dump every eval completion (tokens, logprobs) for checking.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import string
import time

import torch
from fireworks.training import tinker  # the SDK's own (vendored) Tinker types
from fireworks.training.sdk import AdaptiveConcurrencyController, FiretitanServiceClient
from transformers import AutoTokenizer

LETTERS = string.ascii_uppercase[:-1]  # A..Y: each has a successor


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=int(os.environ.get("WALKTHROUGH_STEPS", "40")))
    parser.add_argument("--eval-interval", type=int, default=int(os.environ.get("WALKTHROUGH_EVAL_INTERVAL", "10")))
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--deployment-id", default=os.environ.get("WALKTHROUGH_DEPLOYMENT_ID", "research-serving"))
    parser.add_argument("--trainer-job-id", default=None, help="re-attach to a running trainer job")
    parser.add_argument("--target-score", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def prompt_for(letter: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Which letter comes after {letter}?"}]


def answer_for(letter: str) -> str:
    return chr(ord(letter) + 1)


def build_micro_batches(tokenizer, rng: random.Random, n: int = 2) -> list[list[tinker.Datum]]:
    letters = list(LETTERS)
    rng.shuffle(letters)
    batches = []
    for i in range(n):
        data = []
        for x in letters[i::n]:
            prompt = tokenizer.apply_chat_template(prompt_for(x), tokenize=True, add_generation_prompt=True,
                                                   return_dict=False)
            answer = [*tokenizer.encode(answer_for(x), add_special_tokens=False), tokenizer.eos_token_id]
            tokens = list(prompt) + answer
            weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
            data.append(tinker.Datum(model_input=tinker.ModelInput.from_ints(tokens[:-1]),
                                     loss_fn_inputs={"target_tokens": tinker.TensorData.from_torch(torch.tensor(tokens[1:])),
                                                     "weights": tinker.TensorData.from_torch(torch.tensor(weights))}))
        batches.append(data)
    return batches


def objective(data, logprobs_list):
    """Mean negative log-likelihood of the answer tokens (a custom SFT loss)."""
    weights = [torch.tensor(d.loss_fn_inputs["weights"].data, dtype=torch.float32) for d in data]
    total = sum(w.sum() for w in weights)
    loss = -sum((lp * w).sum() for lp, w in zip(logprobs_list, weights, strict=True)) / total
    return loss, {"loss": float(loss.item())}


def evaluate_responses(completions, letters: list[str]) -> float:
    return sum(c.text.strip() == answer_for(x) for c, x in zip(completions, letters, strict=True)) / len(letters)


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    api_key = os.environ["FIREWORKS_API_KEY"]
    base_url = os.environ.get("FIREWORKS_BASE_URL", "https://api.fireworks.ai")
    base_model = os.environ.get("BASE_MODEL", "accounts/fireworks/models/qwen3-8b")
    tokenizer_model = os.environ.get("TOKENIZER_MODEL", "Qwen/Qwen3-8B")
    shape_id = os.environ.get("TRAINING_SHAPE_ID", "accounts/fireworks/trainingShapes/qwen3-8b-128k-h200")
    record_path = os.environ.get("WALKTHROUGH_RECORD")
    record: dict = {"evals": [], "trainer_job_id": None, "deployment_id": None}

    # 1. Bootstrap trainer and deployment (the seed's call, unchanged) ---------------------------
    service = FiretitanServiceClient.from_firetitan_config(
        api_key=api_key,
        base_url=base_url,
        base_model=base_model,
        tokenizer_model=tokenizer_model,
        lora_rank=0,
        training_shape_id=shape_id,
        deployment_id=args.deployment_id,
        learning_rate=args.learning_rate,
        replica_count=1,
        cleanup_trainer_on_close=True,
        cleanup_deployment_on_close="scale_to_zero",
        **({"trainer_job_id": args.trainer_job_id} if args.trainer_job_id else {}),
    )
    scores: list[tuple[int, float]] = []
    try:
        training_client = service.create_training_client(base_model=base_model, lora_rank=0)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_model, trust_remote_code=True)
        concurrency = AdaptiveConcurrencyController(initial_window=16)
        sampler = service.create_deployment_sampler(tokenizer=tokenizer, concurrency_controller=concurrency)
        ids = {"trainer_job_id": service.trainer_job_id, "deployment_id": service.deployment_id}
        record.update(ids)
        print(ids, f"ready after {time.monotonic() - started:.0f}s", flush=True)

        eval_prompts = [prompt_for(x) for x in LETTERS]
        rng = random.Random(args.seed)

        def run_eval(step: int) -> float:
            # 3. Save, sync, sample, evaluate -----------------------------------------------------
            nonlocal sampler
            saved = training_client.save_weights_for_sampler(f"step_{step:05d}").result()
            sampler = service.create_deployment_sampler(model_path=saved.path, tokenizer=tokenizer,
                                                        concurrency_controller=concurrency)
            # The official `sample_with_tokens` takes ONE conversation (n completions of it), so an
            # eval set is one call per prompt, gathered.
            async def sample_all():
                return await asyncio.gather(*(sampler.sample_with_tokens(messages=p, n=1, max_tokens=4,
                                                                         temperature=1.0, logprobs=True)
                                              for p in eval_prompts))

            completions = [c for per_prompt in asyncio.run(sample_all()) for c in per_prompt[:1]]
            score = evaluate_responses(completions, list(LETTERS))
            scores.append((step, score))
            record["evals"].append({"step": step, "checkpoint": saved.path, "score": score, "completions": [
                {"text": c.text, "full_tokens": list(c.full_tokens), "prompt_len": c.prompt_len,
                 "completion_len": c.completion_len, "finish_reason": c.finish_reason,
                 "sampling_logprobs": list(c.sampling_logprobs or [])} for c in completions]})
            print({"step": step, "checkpoint": saved.path, "eval_score": round(score, 3)}, flush=True)
            return score

        run_eval(0)
        for step in range(1, args.steps + 1):
            # 2. Train step with custom objective: accumulate client-side, then one optim_step.
            for micro_batch in build_micro_batches(tokenizer, rng):
                training_client.forward_backward_custom(micro_batch, objective).result()
            training_client.optim_step(
                tinker.AdamParams(learning_rate=args.learning_rate, beta1=0.9, beta2=0.999, eps=1e-8,
                                  weight_decay=0.01)
            ).result()
            if (step % args.eval_interval == 0 or step == args.steps) and run_eval(step) >= args.target_score:
                break
    finally:
        closing = time.monotonic()
        service.close()
        record["close_s"] = time.monotonic() - closing
        print(f"close took {record['close_s']:.2f}s", flush=True)
        if record_path:
            with open(record_path, "w") as fh:
                json.dump(record, fh)
    print("eval scores: " + ", ".join(f"step {st}: {sc:.2f}" for st, sc in scores))


if __name__ == "__main__":
    main()
