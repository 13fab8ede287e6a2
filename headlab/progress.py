"""Progress bars for loops that take more than a few seconds (rich, with ETA; silenced by HEADLAB_PROGRESS=0 and when
output is not a terminal, where `headlab scan` prints one plain line per probe instead)."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress_enabled() -> bool:
    return os.environ.get("HEADLAB_PROGRESS", "1") not in ("0", "false", "no")


def progress_bar(items: Iterable[T], description: str, *, disable: bool = False, total: int | None = None) -> Iterator[T]:
    """Iterate `items` with a rich progress bar (bar, count, elapsed, ETA) unless disabled."""
    if disable or not progress_enabled() or not _terminal():  # in a log file a live bar leaves only blank lines
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    columns = [f"[bold]{description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=True) as bar:
        yield from bar.track(items, total=total if total is not None else _length(items))


def _terminal() -> bool:
    from rich.console import Console

    return Console().is_terminal


def _length(items) -> int | None:
    try:
        return len(items)
    except TypeError:
        return None
