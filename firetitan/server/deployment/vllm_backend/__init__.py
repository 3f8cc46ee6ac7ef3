"""Deployment backend `engine: vllm`: firetitan's deployment contract served by a `vllm serve` child it fronts.

The worker (`python -m firetitan.server.deployment.vllm_backend`) runs in firetitan's own interpreter;
the vLLM server runs as a child process started from the vLLM virtualenv's interpreter
(`FIRETITAN_VLLM_PYTHON`, default `.venv-vllm/bin/python`), because vLLM pins its own transformers.
See docs/scaling-out.md for why a child rather than vLLM's async engine in this process.
"""
