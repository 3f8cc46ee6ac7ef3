"""Deployment worker: a continuous-batching sampler with KV cache and weight hot-load."""
