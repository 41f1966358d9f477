"""Progress of long work: a rich bar with ETA on a terminal, a log line now and then without one.

Every long stage (warmup, features, attribute) reports through `track`. On a terminal the bar counts
what the user thinks in (examples, steps, rows), shows a throughput (tokens/s where tokens are counted)
and the time left. Without a terminal (CI logs, `nohup`, a batch scheduler) it prints one line to
stderr at every 10% and at least once a minute, so a log shows the work moving. `note` prints the
one-line messages around the work ("already complete", "resuming at k of n", a cache filled).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TextIO

#: No throughput is shown before this much time has passed.
MIN_RATE_SECONDS = 0.05
#: Without a terminal: a line at every this fraction of the work...
LOG_FRACTION = 0.1
#: ... and at least every this many seconds.
LOG_SECONDS = 60.0


def note(message: str, stream: TextIO | None = None) -> None:
    """One information line on stderr, `poise: <message>`."""
    print(f"poise: {message}", file=stream or sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Tracker:
    """Counts done units (and tokens) of one piece of work; `advance` after each part."""

    def __init__(self, description: str, total: int, unit: str, done: int, bar: Any, stream: TextIO,
                 log: bool) -> None:
        self.description = description
        self.total = max(0, int(total))
        self.unit = unit
        self.done = int(done)
        self.tokens = 0
        self._start_done = self.done
        self._started = time.monotonic()
        self._bar = bar
        self._task = bar.add_task(description, total=self.total, completed=self.done, rate="") if bar else None
        self._stream = stream
        self._log = log
        self._last_line = self._started
        self._last_fraction = self.done / self.total if self.total else 0.0
        self.fields: dict[str, str] = {}

    def rate(self) -> str:
        """Throughput since this run started: tokens/s when tokens are counted, else units/s."""
        elapsed = time.monotonic() - self._started
        if elapsed < MIN_RATE_SECONDS or self.done == self._start_done:
            return ""  # a rate over microseconds says nothing (attribution of a small pool: "50,000,000 rows/s")
        if self.tokens:
            return f"{self.tokens / elapsed:,.0f} tokens/s"
        per_second = (self.done - self._start_done) / elapsed
        if per_second >= 100:
            return f"{per_second:,.0f} {self.unit}/s"
        if per_second >= 0.1:
            return f"{per_second:.2f} {self.unit}/s"
        return f"{1 / per_second:.1f} s per {self.unit.removesuffix('s')}"

    def eta(self) -> float | None:
        elapsed = time.monotonic() - self._started
        progressed = self.done - self._start_done
        if progressed <= 0:
            return None
        return elapsed / progressed * (self.total - self.done)

    def advance(self, units: int = 1, tokens: int = 0, **fields: Any) -> None:
        self.done += int(units)
        self.tokens += int(tokens)
        self.fields.update({k: str(v) for k, v in fields.items()})
        extra = "  ".join(f"{k} {v}" for k, v in self.fields.items())
        rate = self.rate()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate="  ".join(x for x in (rate, extra) if x))
        if not self._log or not self.total:
            return
        now = time.monotonic()
        fraction = self.done / self.total
        crossed = int(fraction / LOG_FRACTION) > int(self._last_fraction / LOG_FRACTION)
        if crossed or now - self._last_line >= LOG_SECONDS or self.done >= self.total:
            self._last_line, self._last_fraction = now, fraction
            eta = self.eta()
            parts = [f"{self.done}/{self.total} {self.unit} ({100 * fraction:.0f}%)", rate, extra,
                     f"{_clock(now - self._started)} elapsed",
                     "" if eta is None or self.done >= self.total else f"about {_clock(eta)} left"]
            print(f"poise: {self.description}: " + ", ".join(p for p in parts if p), file=self._stream, flush=True)


@contextmanager
def track(description: str, total: int, unit: str = "examples", done: int = 0, enabled: bool = True,
          stream: TextIO | None = None) -> Iterator[Tracker]:
    """A `Tracker` for `total` units of work (`done` of them finished before this run, e.g. on resume).

    `enabled=False` (e.g. not rank 0) shows nothing. The bar is transient: it disappears when the work
    ends, and the caller prints the one-line result.
    """
    stream = stream or sys.stderr
    terminal = enabled and stream.isatty()
    if not terminal:
        yield Tracker(description, total, unit, done, None, stream, log=enabled)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(file=stream), transient=True) as bar:
        yield Tracker(description, total, unit, done, bar, stream, log=False)


@contextmanager
def callback(description: str, unit: str, log: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yields a (done, total) callback for stages that report progress that way (attribute, select): a bar
    on a terminal; without one, log lines (`log`) or nothing. The bar starts at the first call."""
    state: dict = {}
    with ExitStack() as stack:
        def update(done: int, total: int) -> None:
            if "tracker" not in state:
                state["tracker"] = stack.enter_context(
                    track(description, total, unit=unit, enabled=log or sys.stderr.isatty()))
            tracker = state["tracker"]
            tracker.advance(done - tracker.done)

        yield update
