"""Structured logging setup: structlog over the stdlib `firetitan` logger, console or JSON lines.

`get_logger(__name__, job_id=...)` is all library code needs. Output goes to stderr through one handler
on the `firetitan` stdlib logger, so firetitan never touches the application's root logger unless asked
(`capture_stdlib=True`, used by our own worker processes to route aiohttp/transformers logs too).

Environment: `FIRETITAN_LOG_LEVEL` (debug|info|warning|error, default info) and
`FIRETITAN_LOG_FORMAT` (`console`, the default, or `json` for one JSON object per line).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import IO, Any, Literal

import structlog

from firetitan.redaction import redact_event

__all__ = ["configure_logging", "get_logger"]

LogFormat = Literal["console", "json"]
_ROOT = "firetitan"
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

_lock = threading.Lock()
_state: dict[str, Any] = {}  # what the last configure_logging call installed

# Runs for every event before it reaches the stdlib handler; the renderer lives in the formatter,
# so switching format never needs structlog reconfigured (and cached loggers stay valid).
_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


# Our loggers carry their own processor chain (structlog.wrap_logger), so firetitan never changes the
# application's global structlog configuration.
_PROCESSORS: list[Any] = [
    structlog.stdlib.filter_by_level,
    *_SHARED,
    structlog.stdlib.PositionalArgumentsFormatter(),
    structlog.processors.UnicodeDecoder(),
    redact_event,  # no key in any log line
    structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
]


def _parse_level(level: str | int | None) -> int:
    if level is None:
        level = os.environ.get("FIRETITAN_LOG_LEVEL", "info")
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"log level {level!r} is not one of {sorted(set(_LEVELS))}") from None


def _parse_format(fmt: str | None) -> LogFormat:
    fmt = (fmt or os.environ.get("FIRETITAN_LOG_FORMAT") or "console").strip().lower()
    if fmt not in ("console", "json"):
        raise ValueError(f"log format {fmt!r} is not 'console' or 'json'")
    return fmt  # type: ignore[return-value]


def _renderer(fmt: LogFormat, stream: IO[str]) -> Any:
    if fmt == "json":
        return structlog.processors.JSONRenderer()
    colors = bool(getattr(stream, "isatty", lambda: False)())
    # No locals in tracebacks: they are long and may hold API keys.
    exc_fmt = (
        structlog.dev.RichTracebackFormatter(show_locals=False)
        if colors and structlog.dev.rich is not None
        else structlog.dev.plain_traceback
    )
    return structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=exc_fmt)


def configure_logging(
    level: str | int | None = None,
    fmt: LogFormat | str | None = None,
    *,
    stream: IO[str] | None = None,
    capture_stdlib: bool = False,
) -> None:
    """Install firetitan's log handler; safe to call many times (same arguments = no change).

    `level`/`fmt` default to `FIRETITAN_LOG_LEVEL`/`FIRETITAN_LOG_FORMAT`. `stream` defaults to stderr.
    `capture_stdlib=True` also routes every other stdlib logger (root) through the same handler.
    """
    lvl, form = _parse_level(level), _parse_format(fmt)
    out = stream if stream is not None else sys.stderr
    wanted = {"level": lvl, "fmt": form, "stream": out, "capture": capture_stdlib}
    with _lock:
        if _state.get("wanted") == wanted:
            return
        exc_processors: list[Any] = (
            [
                structlog.processors.ExceptionRenderer(
                    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
                )
            ]
            if form == "json"
            else []
        )
        handler = logging.StreamHandler(out)
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                # foreign_pre_chain: plain stdlib records (aiohttp, transformers) get the same fields.
                foreign_pre_chain=[*_SHARED, structlog.stdlib.ExtraAdder()],
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    *exc_processors,
                    _renderer(form, out),
                ],
            )
        )
        handler._firetitan = True  # type: ignore[attr-defined]  # marks ours for replacement
        for name in (_ROOT, ""):
            _drop_our_handlers(logging.getLogger(name))
        ours = logging.getLogger(_ROOT)
        ours.setLevel(lvl)
        if capture_stdlib:
            root = logging.getLogger()
            root.addHandler(handler)
            root.setLevel(lvl)
            ours.propagate = True  # the root handler prints firetitan records once
        else:
            ours.addHandler(handler)
            ours.propagate = False
        _state["wanted"] = wanted


def _drop_our_handlers(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        if getattr(h, "_firetitan", False):
            logger.removeHandler(h)  # not closed: the stream belongs to the caller


def get_logger(name: str = _ROOT, **bound: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger for `name` (use `__name__`), with `bound` context on every event.

    Configures logging from the environment on first use if nobody has yet (a bad
    `FIRETITAN_LOG_LEVEL`/`FIRETITAN_LOG_FORMAT` falls back to info/console with a warning).
    """
    if not _state:
        try:
            configure_logging()
        except ValueError as exc:  # a bad env var must not make `import firetitan` fail
            configure_logging("info", "console")
            _bound(logging.getLogger(_ROOT)).warning("bad_logging_environment", error=str(exc))
    if name != _ROOT and not name.startswith(_ROOT + "."):
        name = f"{_ROOT}.{name}"  # keep every SDK record under our handler
    logger = _bound(logging.getLogger(name))
    return logger.bind(**bound) if bound else logger


def _bound(stdlib_logger: logging.Logger) -> structlog.stdlib.BoundLogger:
    return structlog.wrap_logger(
        stdlib_logger,
        processors=_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )  # type: ignore[return-value]
