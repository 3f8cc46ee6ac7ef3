"""A local Ray cluster for the Ray tests: started here, its address printed, shut down when stdin closes."""

from __future__ import annotations

import json
import sys
import time

import ray

began = time.monotonic()
# Two CPUs and a small object store: the workers exchange only small dicts with the control plane.
ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
         namespace="firetitan-test-cluster")
print(json.dumps({"address": ray.get_runtime_context().gcs_address, "seconds": time.monotonic() - began}), flush=True)
sys.stdin.read()
ray.shutdown()
