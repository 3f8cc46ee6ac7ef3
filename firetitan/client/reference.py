"""A frozen reference policy for KL / DPO: forward passes only, on its own trainer or the policy's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from firetitan.client.training import TrainingClient
from firetitan.futures import APIFuture
from firetitan.types import ForwardBackwardOutput


class ReferenceClient:
    """`forward(data, loss_fn)` on a frozen model.

    Backed either by the LoRA policy's own trainer with its adapters switched off (no second model),
    or by a separate forward-only trainer job. It has no backward or optimizer calls by design.
    """

    def __init__(self, training_client: TrainingClient, *, disable_adapter: bool, job_id: str | None) -> None:
        self._client = training_client
        self._disable_adapter = disable_adapter
        self.job_id = job_id

    @property
    def shares_policy_trainer(self) -> bool:
        return self._disable_adapter

    def forward(self, data: Sequence[Any], loss_fn: str = "cross_entropy",
                loss_fn_config: Mapping[str, float | str] | None = None) -> APIFuture[ForwardBackwardOutput]:
        return self._client.forward(data, loss_fn, loss_fn_config, disable_adapter=self._disable_adapter)

    async def forward_async(self, data: Sequence[Any], loss_fn: str = "cross_entropy",
                            loss_fn_config: Mapping[str, float | str] | None = None) -> ForwardBackwardOutput:
        return await self.forward(data, loss_fn, loss_fn_config)

    def get_info(self) -> Any:
        return self._client.get_info()

    def get_tokenizer(self) -> Any:
        return self._client.get_tokenizer()

    def __repr__(self) -> str:
        backing = "policy trainer, adapters off" if self._disable_adapter else f"trainer job {self.job_id}"
        return f"ReferenceClient({backing})"
