"""Client process for the reconnect test: trains forever on a fixed trainer id until it is killed."""

from __future__ import annotations

import json
import sys

from firetitan import types
from firetitan.client.service import FiretitanServiceClient


def main() -> None:
    service = FiretitanServiceClient.from_firetitan_config(
        base_model="firetitan/nano-qwen3", trainer_job_id=sys.argv[1], deployment_id=sys.argv[2],
        learning_rate=1e-2, cleanup_trainer_on_close=True, cleanup_deployment_on_close="scale_to_zero")
    client = service.create_training_client()
    tokens = list(range(10, 40))
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    saved = client.save_weights_for_sampler("first").result()
    service.create_deployment_sampler(model_path=saved.path)
    step = 0
    while True:  # killed with SIGKILL by the test: no cleanup runs
        client.forward_backward([datum], "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        step += 1
        if step == 2:
            client.save_state("step-2").result()  # a named train state the reconnected client loads
        print(json.dumps({"step": step, "synced": saved.path}), flush=True)


if __name__ == "__main__":
    main()
