"""Choosing a provisioner: the flags and environment that pick it, and a typed error for a bad name."""

from __future__ import annotations

import argparse

import pytest

from firetitan.errors import ConfigError
from firetitan.server.control_plane.__main__ import add_server_args, settings_from_args
from firetitan.server.control_plane.provisioner import LocalProvisioner, make_provisioner


def _settings(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    return settings_from_args(parser.parse_args(argv))


def test_local_is_the_default_and_ray_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FIRETITAN_PROVISIONER", "FIRETITAN_RAY_ADDRESS", "FIRETITAN_RAY_GPUS_PER_WORKER"):
        monkeypatch.delenv(name, raising=False)
    default = _settings([])
    assert (default.provisioner, default.ray_address, default.ray_gpus_per_worker) == ("local", None, 0.0)
    assert isinstance(make_provisioner(default.provisioner), LocalProvisioner)
    chosen = _settings(["--provisioner", "ray", "--ray-address", "127.0.0.1:6379", "--ray-gpus-per-worker", "0.5"])
    assert (chosen.provisioner, chosen.ray_address, chosen.ray_gpus_per_worker) == ("ray", "127.0.0.1:6379", 0.5)


def test_the_embedded_daemon_reads_the_provisioner_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK starts its daemon with only --home and --exit-when-idle: the environment carries the rest.
    monkeypatch.setenv("FIRETITAN_PROVISIONER", "ray")
    monkeypatch.setenv("FIRETITAN_RAY_ADDRESS", "auto")
    settings = _settings([])
    assert (settings.provisioner, settings.ray_address) == ("ray", "auto")


def test_an_unknown_provisioner_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError) as err:
        make_provisioner("kubernetes")
    assert err.value.field == "provisioner"
    assert "'kubernetes'" in err.value.message and "local, ray" in err.value.message
