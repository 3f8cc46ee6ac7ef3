"""A tinker-cookbook style RL loop, written against the plain `tinker` SDK, run on firetitan.

Only the base URL changes from a hosted run (the key comes from $TINKER_API_KEY, a `tml-` key):

    firetitan serve --api-key tml-local            # or any running control plane with a tml- key
    TINKER_API_KEY=tml-local python examples/tinker_rl_loop.py --base-url http://127.0.0.1:8700

The environment is tiny so it runs on a laptop CPU: each prompt is a short token sequence and a
completion earns the fraction of its tokens that are even ids. Per iteration, as in the cookbook's
`rl/train.py`: publish the current weights to a sampler, sample a group per prompt, centre the
rewards within each group (advantages), and take one importance-sampling step on those samples.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import tinker
from tinker import types

PROMPTS = [[11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34, 35]]


def reward(tokens: list[int]) -> float:
    """The environment: how many of the completion's tokens are even ids."""
    return sum(1 for t in tokens if t % 2 == 0) / max(1, len(tokens))


def make_datum(prompt: list[int], seq: types.SampledSequence, advantage: float) -> types.Datum:
    """One trajectory as a right-shifted datum: the prompt positions get zero advantage."""
    tokens = prompt + list(seq.tokens)
    n_prompt = len(prompt) - 1
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:],
                        "logprobs": [0.0] * n_prompt + list(seq.logprobs or []),
                        "advantages": [0.0] * n_prompt + [advantage] * (n - n_prompt)})


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL"))
    parser.add_argument("--base-model", default="firetitan/nano-qwen3")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    args = parser.parse_args()

    with tinker.ServiceClient(base_url=args.base_url) as service:
        training = await service.create_lora_training_client(base_model=args.base_model, rank=8)
        params = types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0)
        for iteration in range(args.iterations):
            sampler = await training.save_weights_and_get_sampling_client()
            groups = await asyncio.gather(*(
                sampler.sample(types.ModelInput.from_ints(p), num_samples=args.group_size, sampling_params=params) for p in PROMPTS))
            data, rewards = [], []
            for prompt, result in zip(PROMPTS, groups, strict=True):
                group = [reward(list(s.tokens)) for s in result.sequences]
                mean = sum(group) / len(group)
                rewards += group
                data += [make_datum(prompt, s, r - mean) for s, r in zip(result.sequences, group, strict=True)
                         if r != mean]
            if data:
                # Submitted back to back (ordered by the client's seq ids), then awaited together.
                fb = training.forward_backward(data, "importance_sampling")
                opt = training.optim_step(types.AdamParams(learning_rate=args.learning_rate, eps=1e-8))
                await fb
                await opt
            print(f"iteration {iteration}: mean reward {sum(rewards) / len(rewards):.3f} "
                  f"({len(data)} trajectories trained)", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
