"""The trainer worker: a Tinker-style REST service holding one or more trainable torch models."""

from firetitan.server.trainer.app import TrainerSettings, build_app

__all__ = ["TrainerSettings", "build_app"]
