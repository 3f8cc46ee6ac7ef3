"""A rich progress bar that recipes report into (shared by the examples)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def progress_bar(title: str, keys: tuple[str, ...]) -> Iterator[Any]:
    columns = [TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns) as progress:
        task = progress.add_task(title, total=None, info="starting services…")

        def on_progress(step: int, total: int, rec: dict[str, Any]) -> None:
            info = "  ".join(f"{k}={rec[k]:.3f}" for k in keys if isinstance(rec.get(k), int | float))
            progress.update(task, completed=step, total=total, info=info)

        yield on_progress
