"""Data-parallel trainer: one job's model sharded with FSDP2 over N rank processes (see docs/data-parallel-trainer.md)."""

MAX_WORLD_SIZE = 8
