"""Sampling benchmarks: RL-shaped load, the simulated deployment, the harness and its plots."""
