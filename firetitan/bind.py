"""Which addresses a server may listen on without an API key: loopback only."""

from __future__ import annotations

import ipaddress

from firetitan.errors import ConfigError


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127/8, ::1, `localhost`)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_key_off_loopback(host: str, api_key: str | None) -> None:
    """Refuse to listen where other machines can reach us unless requests need a key."""
    if not api_key and not is_loopback(host):
        raise ConfigError(f"--host {host!r} is reachable from other machines: pass --api-key or set "
                          "$FIRETITAN_WORKER_API_KEY (the control plane hands its workers theirs)",
                          field="api_key")
