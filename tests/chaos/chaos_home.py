"""Shared names of the chaos suite; its home is tests/home_helpers.Home (waiting on resources included)."""

from __future__ import annotations

from home_helpers import Home, wait_until

NANO = "firetitan/nano-qwen3"
ACCT = "/v1/accounts/local"
ChaosHome = Home

__all__ = ["ACCT", "NANO", "ChaosHome", "wait_until"]
