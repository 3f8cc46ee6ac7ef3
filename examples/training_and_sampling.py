"""The seed walkthrough (training-and-sampling.md) on firetitan: train, save, sync, sample, evaluate.

Task: "Which letter comes after K?" -> "L". The built-in models start from random weights, so the
eval score starts near 0; a custom SFT objective through `forward_backward_custom` teaches the
successor of every letter A..Y in a few minutes on two CPU cores.

    python examples/training_and_sampling.py            # firetitan/tiny-qwen3, local daemon
    python examples/training_and_sampling.py --base-model firetitan/nano-qwen3 --steps 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import string
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from firetitan import types as tinker
from firetitan.client.concurrency import AdaptiveConcurrencyController
from firetitan.client.service import FiretitanServiceClient
from firetitan.models import load_tokenizer

console = Console()
LETTERS = string.ascii_uppercase[:-1]  # A..Y: each has a successor


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default=os.environ.get("FIRETITAN_DEMO_MODEL", "firetitan/tiny-qwen3"))
    parser.add_argument("--steps", type=int, default=int(os.environ.get("FIRETITAN_DEMO_STEPS", "200")))
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--micro-batches", type=int, default=2, help="forward/backward calls per optim_step")
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--deployment-id", default="research-serving")
    parser.add_argument("--target-score", type=float, default=0.9, help="stop once an eval reaches this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deployment-engine", choices=["embedded", "vllm"], default=None,
                        help="serve the deployment with vLLM instead of the embedded engine (`make vllm-env`)")
    parser.add_argument("--device", default=os.environ.get("FIRETITAN_DEVICE"),
                        help="auto|cpu|cuda[:i]|mps for the trainer and the deployment (default: the server's)")
    parser.add_argument("--dtype", default=os.environ.get("FIRETITAN_DTYPE"),
                        help="float32|bfloat16 (default: the server's, else float32)")
    return parser.parse_args()


def prompt_for(letter: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Which letter comes after {letter}?"}]


def answer_for(letter: str) -> str:
    return chr(ord(letter) + 1)


def build_datum(tokenizer, letter: str) -> tinker.Datum:
    """SFT datum: predict the answer and the end-of-turn token; the prompt is not trained on."""
    prompt = tokenizer.apply_chat_template(prompt_for(letter), tokenize=True, add_generation_prompt=True,
                                           return_dict=False)
    answer = [*tokenizer.encode(answer_for(letter), add_special_tokens=False), tokenizer.eos_token_id]
    tokens = list(prompt) + answer
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
    return tinker.Datum(model_input=tinker.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights})


def build_micro_batches(tokenizer, rng: random.Random, n: int) -> list[list[tinker.Datum]]:
    """One pass over the letters in a random order, split into `n` micro-batches."""
    letters = list(LETTERS)
    rng.shuffle(letters)
    return [[build_datum(tokenizer, x) for x in letters[i::n]] for i in range(n)]


def objective(data: list[tinker.Datum], logprobs_list: list[torch.Tensor]):
    """Mean negative log-likelihood of the weighted (answer) tokens: a custom SFT loss."""
    weights = [d.loss_fn_inputs["weights"].to_torch() for d in data]
    total = sum(w.sum() for w in weights)
    loss = -sum((lp * w).sum() for lp, w in zip(logprobs_list, weights, strict=True)) / total
    return loss, {"loss": float(loss.item())}


def evaluate_responses(completions, letters: list[str]) -> float:
    correct = sum(c.text.strip() == answer_for(x) for c, x in zip(completions, letters, strict=True))
    return correct / len(letters)


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    base_model = args.base_model
    tokenizer_model = args.base_model
    shape_id = f"accounts/local/trainingShapes/{base_model.split('/')[-1]}-cpu"

    # 1. Bootstrap trainer and deployment ---------------------------------------------------------
    service = FiretitanServiceClient.from_firetitan_config(
        base_model=base_model,
        tokenizer_model=tokenizer_model,
        lora_rank=0,
        training_shape_id=shape_id,
        deployment_id=args.deployment_id,
        learning_rate=args.learning_rate,
        replica_count=1,
        deployment_engine=args.deployment_engine,
        cleanup_trainer_on_close=True,
        cleanup_deployment_on_close="scale_to_zero",
        device=args.device,
        dtype=args.dtype,
    )
    scores: list[tuple[int, float]] = []
    try:
        with console.status("provisioning the trainer and the deployment (first run starts the local daemon)"):
            training_client = service.create_training_client(base_model=base_model, lora_rank=0)
            tokenizer = load_tokenizer(tokenizer_model)
            concurrency = AdaptiveConcurrencyController(initial_window=16)
            sampler = service.create_deployment_sampler(tokenizer=tokenizer, concurrency_controller=concurrency)
        console.print({"trainer_job_id": service.trainer_job_id, "deployment_id": service.deployment_id})
        console.print(f"ready after {time.monotonic() - started:.0f}s")

        eval_letters = list(LETTERS)
        eval_prompts = [prompt_for(x) for x in eval_letters]
        rng = random.Random(args.seed)

        def run_eval(step: int) -> float:
            # 3. Save, sync, sample, evaluate -------------------------------------------------
            nonlocal sampler
            saved = training_client.save_weights_for_sampler(f"step_{step:05d}").result()
            # Passing model_path syncs the saved snapshot into the deployment and returns a
            # sampler backed by it.
            sampler = service.create_deployment_sampler(model_path=saved.path, tokenizer=tokenizer,
                                                        concurrency_controller=concurrency)
            completions = asyncio.run(sampler.sample_with_tokens(messages=eval_prompts, n=1, max_tokens=4,
                                                                temperature=0.0))
            score = evaluate_responses(completions, eval_letters)
            scores.append((step, score))
            console.print({"step": step, "checkpoint": saved.path, "eval_score": round(score, 3)})
            return score

        run_eval(0)
        columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                   TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("train", total=args.steps, loss="")
            for step in range(1, args.steps + 1):
                # 2. Train step with custom objective: accumulate client-side, then one optim_step.
                losses = []
                for micro_batch in build_micro_batches(tokenizer, rng, args.micro_batches):
                    out = training_client.forward_backward_custom(micro_batch, objective).result()
                    losses.append(out.metrics["loss"])
                training_client.optim_step(
                    tinker.AdamParams(learning_rate=args.learning_rate, beta1=0.9, beta2=0.999, eps=1e-8,
                                      weight_decay=0.01)
                ).result()
                progress.update(task, advance=1, loss=f"loss {sum(losses) / len(losses):.3f}")
                if step % args.eval_interval == 0 or step == args.steps:
                    if run_eval(step) >= args.target_score:
                        break
    finally:
        service.close()

    elapsed = time.monotonic() - started
    best = max((s for _, s in scores), default=0.0)
    console.rule("summary")
    console.print(f"model {base_model} | trainer {service.trainer_job_id} | deployment {service.deployment_id}")
    console.print("eval scores: " + ", ".join(f"step {st}: {sc:.2f}" for st, sc in scores))
    console.print(f"first {scores[0][1] if scores else 0:.2f} -> best {best:.2f} in {elapsed:.0f}s wall time")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # service.close() already ran in main's `finally:`
        console.print("interrupted: the trainer and the deployment were cleaned up")
        raise SystemExit(130) from None
