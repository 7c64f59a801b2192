"""One progress display for every long CLI step (indexing, benchmarks, training).

On a terminal: rich bars (done/total, rate, ETA). Anywhere else (nohup, CI, a pipe, a log file): plain
lines, one per step every ``interval`` seconds and when a step finishes, e.g.
``chunks 1,200/5,000 (24%) 35.2 vec/s ETA 1m48s``, so a log shows that the run is alive and how far it is.

>>> with progress_display() as p:
...     task = p.add("chunks", total=len(batches), unit="vec")
...     for i, b in enumerate(batches, 1):
...         p.update(task, i)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from rich.console import Console

from ._common import err, shown


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class _Plain:
    label: str
    total: int | None
    unit: str
    started: float = field(default_factory=lambda: time.monotonic())
    done: int = 0
    base: int = 0  # already done when the step began (a resumed run): not part of the rate
    detail: str = ""
    printed_at: float = 0.0
    finished: bool = False


class ProgressDisplay:
    """Rich bars on a terminal, plain periodic lines otherwise; use through :func:`progress_display`."""

    def __init__(self, console: Console | None = None, *, plain: bool | None = None,
                 interval: float | None = None, enabled: bool = True) -> None:
        self.console = console or err
        self.enabled = enabled  # False: draw nothing (e.g. on the non-main ranks of a distributed run)
        self.plain = (not self.console.is_terminal) if plain is None else plain
        env = os.environ.get("RAGEN_PROGRESS_INTERVAL")
        self.interval = interval if interval is not None else float(env) if env else 10.0
        self._tasks: list[_Plain] = []
        self._bar = None

    # --- lifetime -----------------------------------------------------------------------------------------
    def __enter__(self) -> ProgressDisplay:
        if self.enabled and not self.plain:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TimeElapsedColumn(),
                                 TextColumn("[dim]{task.fields[detail]}"), console=self.console, transient=False)
            self._bar.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)
            self._bar = None

    def start(self) -> ProgressDisplay:
        return self.__enter__()

    def stop(self) -> None:
        self.__exit__(None, None, None)

    # --- tasks --------------------------------------------------------------------------------------------
    def add(self, label: str, total: int | None = None, *, unit: str = "", completed: int = 0) -> int:
        """A new step (``completed``: already done, e.g. when resuming); returns its handle for :meth:`update`."""
        self._tasks.append(_Plain(label, total or None, unit, done=completed, base=completed))
        handle = len(self._tasks) - 1
        if self._bar is not None:
            rich_id = self._bar.add_task(shown(label), total=total or None, completed=completed, rate="", detail="")
            assert rich_id == handle
        return handle

    def update(self, handle: int, done: int, total: int | None = None, detail: str = "") -> None:
        """Report ``done`` of ``total`` (the total may change, e.g. once a scan knows it)."""
        t = self._tasks[handle]
        if total is not None:
            t.total = total or None
        t.done = done
        t.detail = detail
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(handle, completed=done, total=t.total, detail=shown(detail, oneline=True))
            speed = self._bar.tasks[handle].speed
            self._bar.update(handle, rate=f"{speed:,.1f} {t.unit}/s".replace(" /s", "/s") if speed else "")
            return
        now = time.monotonic()
        complete = t.total is not None and done >= t.total
        if complete and t.finished:
            return
        if complete or now - t.printed_at >= self.interval:
            t.printed_at = now
            t.finished = complete
            self.console.print(self.line(handle, now), highlight=False, soft_wrap=True)

    def line(self, handle: int, now: float | None = None) -> str:
        """The plain progress line of a step: label, done/total (percent), rate, ETA or elapsed time."""
        t = self._tasks[handle]
        now = time.monotonic() if now is None else now
        elapsed = max(now - t.started, 1e-9)
        rate = (t.done - t.base) / elapsed
        parts = [shown(t.label)]
        if t.total:
            parts.append(f"{t.done:,}/{t.total:,} ({100 * t.done / t.total:.0f}%)")
        else:
            parts.append(f"{t.done:,}")
        if t.done > t.base:
            parts.append(f"{rate:,.1f}{' ' + t.unit if t.unit else ''}/s")
        if t.total and t.done >= t.total:
            parts.append(f"done in {_duration(elapsed)}")
        elif t.total and t.done > t.base:
            parts.append(f"ETA {_duration((t.total - t.done) / rate)}")
        if t.detail:
            parts.append(shown(t.detail, oneline=True))
        return " ".join(parts)


def progress_display(console: Console | None = None, *, plain: bool | None = None,
                     interval: float | None = None, enabled: bool = True) -> ProgressDisplay:
    """A :class:`ProgressDisplay`: bars when ``console`` (default: stderr) is a terminal, else plain lines
    every ``interval`` seconds (default 10, or ``$RAGEN_PROGRESS_INTERVAL``); nothing when not ``enabled``."""
    return ProgressDisplay(console, plain=plain, interval=interval, enabled=enabled)


__all__ = ["ProgressDisplay", "progress_display"]
