"""The `firetitan` command: --version, doctor, and subcommands plugged in by other modules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from firetitan._version import __version__
from firetitan.cli import register_command

TIMEOUT = 120


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "firetitan.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=TIMEOUT,
    )


def test_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"firetitan {__version__}"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "firetitan"
    exe = str(script) if script.exists() else shutil.which("firetitan")
    assert exe is not None, "`make install` (pip install -e .) must put the firetitan console script on PATH"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0 and out.stdout.strip() == f"firetitan {__version__}"


def test_doctor_json(tmp_path: Path) -> None:
    out = run_cli("doctor", "--json", env={"FIRETITAN_HOME": str(tmp_path / "home")})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    import torch
    import transformers

    assert report["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report["versions"]["firetitan"] == __version__
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["transformers"] == transformers.__version__
    assert report["torch"]["num_threads"] >= 1
    assert report["state_dir"]["path"] == str((tmp_path / "home").resolve())
    assert report["state_dir"]["from"] == "FIRETITAN_HOME" and report["state_dir"]["exists"] is False
    assert "doctor" in report["commands"]


def test_doctor_text_uses_default_state_dir_without_env(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import platformdirs

    from firetitan import cli

    monkeypatch.delenv("FIRETITAN_HOME", raising=False)
    assert cli.main(["doctor"]) == 0  # in-process: the JSON test above covers the subprocess path
    out = capsys.readouterr().out
    assert f"path: {Path(platformdirs.user_cache_dir('firetitan')).resolve()}" in out
    assert "from: platformdirs.user_cache_dir" in out
    assert "num_threads:" in out and "transformers:" in out


def test_doctor_never_prints_secrets(tmp_path: Path) -> None:
    secret = "sk-do-not-print-7d1c"
    env = {"FIRETITAN_HOME": str(tmp_path / "home"), "FIRETITAN_API_KEY": secret, "FIRETITAN_HF_TOKEN": secret,
           "FIRETITAN_CLIENT_SECRET": secret, "FIRETITAN_LOG_LEVEL": "warning"}
    for args in (("doctor", "--json"), ("doctor",)):
        out = run_cli(*args, env=env)
        assert out.returncode == 0, out.stderr
        assert secret not in out.stdout and secret not in out.stderr
    report = json.loads(run_cli("doctor", "--json", env=env).stdout)
    assert report["env"]["FIRETITAN_API_KEY"] == "<redacted, 20 chars>"  # set, its length, no character
    assert report["env"]["FIRETITAN_LOG_LEVEL"] == "warning"  # not a secret: shown as is


def test_no_command_prints_help_and_fails() -> None:
    out = run_cli()
    assert out.returncode == 2 and "doctor" in out.stdout


def test_unknown_command_fails() -> None:
    out = run_cli("no-such-command")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_plugin_registers_an_async_command(tmp_path: Path) -> None:
    (tmp_path / "ft_plugin_ok.py").write_text(
        textwrap.dedent(
            """
            import asyncio
            from firetitan.cli import register_command

            def add_args(parser):
                parser.add_argument("--times", type=int, default=1)

            async def run(args):
                await asyncio.sleep(0)
                print("hello " * args.times)
                return 3

            register_command("hello", "say hello", add_args, run)
            """
        )
    )
    env = {
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "FIRETITAN_CLI_PLUGINS": "ft_plugin_ok",
    }
    out = run_cli("hello", "--times", "2", env=env)
    assert out.returncode == 3, out.stderr  # the async run function's return value is the exit code
    assert out.stdout.split() == ["hello", "hello"]


def test_plugin_status_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from firetitan import cli

    (tmp_path / "ft_plugin_broken.py").write_text("import a_dependency_that_is_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FIRETITAN_CLI_PLUGINS", "ft_plugin_broken, ft_plugin_absent")
    help_text = cli.build_parser().format_help()
    assert cli._PLUGIN_STATUS["ft_plugin_absent"] == "not installed"
    assert "a_dependency_that_is_missing" in cli._PLUGIN_STATUS["ft_plugin_broken"]
    assert "ft_plugin_broken" in help_text  # the user learns why a command is missing
    assert "doctor" in help_text


def test_register_command_refuses_clashes_and_bad_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_command("doctor", "clash", None, lambda args: 0)
    with pytest.raises(ValueError, match="must be"):
        register_command("bad name", "x", None, lambda args: 0)
