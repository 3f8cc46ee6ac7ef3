"""The `firetitan` command line: a registry of subcommands that other modules plug into.

A plugin module calls `register_command(...)` at import time and is listed in `PLUGIN_MODULES` (or in
`$FIRETITAN_CLI_PLUGINS`, comma-separated). Plugins are imported only when the parser is built, and a
missing or broken plugin is skipped with its reason shown by `firetitan doctor`; the rest still work.
Keep plugin modules light to import: put torch/transformers imports inside the run function.

    from firetitan.cli import register_command

    def _add_args(parser):
        parser.add_argument("--port", type=int, default=0)

    async def _run(args) -> int:   # plain functions work too; a coroutine function is run with asyncio
        ...
        return 0

    register_command("serve", "run the control plane in the foreground", _add_args, _run)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from firetitan._version import __version__

__all__ = ["PLUGIN_MODULES", "Command", "main", "register_command", "state_dir"]

# Modules that register subcommands; a module that does not exist yet is skipped.
PLUGIN_MODULES: tuple[str, ...] = (
    "firetitan.server.control_plane.cli",  # serve
    "firetitan.status_cli",  # status
    "firetitan.bench.cli",  # bench
    "firetitan.demo.cli",  # demo
    "firetitan.recipes.cli",  # recipe runners
    "firetitan.checkpoints.cli",  # store ls | gc | pin | unpin | du
    "firetitan.models_cli",  # models alias / list
)
PLUGINS_ENV = "FIRETITAN_CLI_PLUGINS"
HOME_ENV = "FIRETITAN_HOME"

AddArgs = Callable[[argparse.ArgumentParser], None]
RunFn = Callable[[argparse.Namespace], Any]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_args: AddArgs | None
    run: RunFn
    module: str


_COMMANDS: dict[str, Command] = {}
_PLUGIN_STATUS: dict[str, str] = {}  # module -> "loaded" or why it was skipped


def register_command(name: str, help: str, add_args_fn: AddArgs | None, run_fn: RunFn) -> None:
    """Add subcommand `name`. `run_fn(args)` returns an exit code (None = 0) and may be async."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"command name {name!r} must be letters, digits, '-' or '_'")
    module = getattr(run_fn, "__module__", "?")
    existing = _COMMANDS.get(name)
    if existing is not None and existing.module != module:
        raise ValueError(f"command {name!r} is already registered by {existing.module}")
    _COMMANDS[name] = Command(name, help, add_args_fn, run_fn, module)


def _load_plugins() -> None:
    extra = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    for module in (*PLUGIN_MODULES, *extra):
        if module in _PLUGIN_STATUS:
            continue
        if not _own_module_exists(module):
            _PLUGIN_STATUS[module] = "not installed"
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Only "this plugin is absent" is quiet; a plugin that fails to import its own deps is reported.
            if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
                _PLUGIN_STATUS[module] = "not installed"
            else:
                _PLUGIN_STATUS[module] = f"failed to import: {exc}"
        except Exception as exc:  # a broken plugin must not take the whole CLI down
            _PLUGIN_STATUS[module] = f"failed to import: {type(exc).__name__}: {exc}"
        else:
            _PLUGIN_STATUS[module] = "loaded"


def _own_module_exists(module: str) -> bool:
    """For `firetitan.*` plugins, look for the file instead of importing: importing `a.b.cli` runs
    `a/b/__init__.py` first, which may import torch even when `cli.py` is absent."""
    parts = module.split(".")
    if parts[0] != "firetitan":
        return True  # someone else's module: let the import decide
    path = Path(__file__).resolve().parent.joinpath(*parts[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


# ---------------------------------------------------------------------------------------------- doctor


def state_dir() -> Path:
    """`$FIRETITAN_HOME`, else the user's cache directory for firetitan (same rule as the control plane)."""
    import platformdirs

    raw = os.environ.get(HOME_ENV) or platformdirs.user_cache_dir("firetitan")
    return Path(raw).expanduser().resolve()


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _doctor_report() -> dict[str, Any]:
    import torch  # imported here: `firetitan --version` must stay fast

    from firetitan.devices import doctor_report

    home = state_dir()
    packages = (
        "firetitan",
        "torch",
        "transformers",
        "tokenizers",
        "peft",
        "safetensors",
        "pydantic",
        "aiohttp",
        "numpy",
        "structlog",
        "tinker",
    )
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": {name: _pkg_version(name) for name in packages},
        "torch": {
            "num_threads": torch.get_num_threads(),
            "num_interop_threads": torch.get_num_interop_threads(),
            "cuda_available": torch.cuda.is_available(),
        },
        "devices": doctor_report(),  # what `device: auto` picks here and which dtypes work on it
        "state_dir": {
            "path": str(home),
            "from": HOME_ENV if os.environ.get(HOME_ENV) else "platformdirs.user_cache_dir",
            "exists": home.exists(),
            "writable": os.access(home if home.exists() else _nearest_existing(home), os.W_OK),
        },
        "env": _redact_env({k: os.environ[k] for k in sorted(os.environ) if k.startswith("FIRETITAN_")}
                           | {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "OMP_NUM_THREADS") if k in os.environ}),
        "commands": sorted(_COMMANDS),
        "plugins": dict(_PLUGIN_STATUS),
    }


def _redact_env(env: dict[str, str]) -> dict[str, str]:
    from firetitan.redaction import redact_env  # keys are never printed (issue 14, 3)

    return redact_env(env)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _print_report(report: dict[str, Any], prefix: str = "") -> None:
    for key, value in report.items():
        if isinstance(value, dict) and value:
            print(f"{prefix}{key}:")
            _print_report(value, prefix + "  ")
        else:
            shown = ", ".join(value) if isinstance(value, list) else ("-" if value in (None, {}) else value)
            print(f"{prefix}{key}: {shown}")


def _doctor_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _doctor(args: argparse.Namespace) -> int:
    report = _doctor_report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0


register_command(
    "doctor", "show versions, torch threads, the state directory and plugins", _doctor_args, _doctor
)


# ---------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    broken = [f"{m} ({why})" for m, why in _PLUGIN_STATUS.items() if why.startswith("failed")]
    parser = argparse.ArgumentParser(
        prog="firetitan",
        description="Self-hostable training and sampling service for post-training language models.",
        epilog=("commands unavailable because a plugin failed to import: " + "; ".join(broken))
        if broken
        else None,
    )
    parser.add_argument("-V", "--version", action="version", version=f"firetitan {__version__}")
    parser.add_argument(
        "--log-level", default=None, help="debug|info|warning|error (or $FIRETITAN_LOG_LEVEL)"
    )
    parser.add_argument("--log-format", default=None, help="console|json (or $FIRETITAN_LOG_FORMAT)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in sorted(_COMMANDS.values(), key=lambda c: c.name):
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        if command.add_args is not None:
            command.add_args(child)
        child.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `firetitan` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["--version"], ["-V"]):  # fast path: no plugin imports
        print(f"firetitan {__version__}")
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    from firetitan.logging import configure_logging

    configure_logging(args.log_level, args.log_format)
    try:
        outcome = args._run(args)
        if inspect.isawaitable(outcome):
            outcome = asyncio.run(_awaited(outcome))
    except KeyboardInterrupt:
        return 130
    return int(outcome or 0)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


if __name__ == "__main__":
    # Re-import so plugins (which import `firetitan.cli`) register into the same module as `main`.
    from firetitan.cli import main as _main

    sys.exit(_main())
