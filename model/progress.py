"""Progress of long steps: library code reports it, the application decides how (and whether) to show it.

Library code wraps a long step, and never prints:

    with progress(len(pairs), "grouping", unit="pairs") as step:
        for pair in pairs:
            ...
            step.update()

    for block in track(vit.blocks, "int4 calibration", unit="blocks"):
        ...

The application installs a display for the time of a command (`showing_progress()`, done once by
the CLI): on a terminal a tqdm bar with counts, rate and ETA for steps longer than a second;
otherwise (a log file, a pipe, CI) a plain line with counts every `DINOSEEK_PROGRESS_INTERVAL`
seconds (default 10) while a step runs, e.g. `index: 1,200/10,000 images (12%), 85/s, ETA 1m43s`,
and its final count. Both go to stderr, never stdout, so a `--json` command's stdout stays pure
JSON. `DINOSEEK_PROGRESS=off` hides them. With no display installed (a Python caller, a server) a
step only counts and nothing is shown.

Why this module lives in `model/` and works like `logging` rather than through callbacks:
`model/` is the lowest layer (indexer and retrieval import it, it imports neither), and int4
calibration is itself a long step in it, reached through `Encoder.from_pretrained` ->
`apply_precision` -> GPTQ. A callback parameter would have to be threaded through every signature
on those paths (and through dedup, reports, actions), each caller passing it on; a display
installed once by the application reaches them all, while the library still only says *what* it
is doing (STYLE 9: only the CLI owns the bar). The display is process-wide, like logging's
handlers, so steps reported from worker threads are shown too. tqdm is imported only when a
display is installed, so importing the library stays light.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Protocol, TypeVar

__all__ = ["Step", "describe", "echo", "observing_steps", "progress", "showing_progress", "track"]

T = TypeVar("T")

INTERVAL_VARIABLE = "DINOSEEK_PROGRESS_INTERVAL"  # seconds between plain lines when stderr is not a terminal
MODE_VARIABLE = "DINOSEEK_PROGRESS"  # auto (default), bar, lines or off
DEFAULT_INTERVAL = 10.0
# Steps shorter than this show no bar: a bar that flashes for 0.2 s is noise. Capped by the
# interval, so an interval of 0 shows every step (tests rely on it).
SHORTEST_SHOWN = 1.0


class _Shown(Protocol):
    """What a display hands back for one step (tqdm's interface, which both displays have)."""

    total: float | None

    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


_display: _Display | None = None  # installed by showing_progress(); None: steps are not shown
_observers = threading.local()  # per thread: callables given each step as it moves (observing_steps)


class Step:
    """One long step: counts what is done, and shows it through the installed display, if any."""

    def __init__(self, total: int | None, what: str, unit: str) -> None:
        self.what, self.unit, self.done = what, unit, 0
        self._total = total
        self._shown: _Shown | None = _display.open(total, what, unit) if _display is not None else None

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, total: int | None) -> None:
        """A total learnt once the step is under way (e.g. after candidates are counted)."""
        self._total = total
        if self._shown is not None:
            self._shown.total = total  # shown from the next update on

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._shown is not None:
            self._shown.update(n)
        for observer in getattr(_observers, "stack", ()):
            observer(self)

    def count(self, items: Iterable[T]) -> Iterator[T]:
        """Yield `items`, counting each as done: for an iterable consumed inside the step's `with`."""
        for item in items:
            yield item
            self.update()

    def close(self) -> None:
        if self._shown is not None:
            self._shown.close()
            self._shown = None


@contextlib.contextmanager
def observing_steps(observer: Callable[[Step], None]) -> Iterator[None]:
    """Call `observer(step)` after each update of a step reported in this thread inside the block
    (its `what`, `done` and `total`): how a server job follows its own apply or undo, while other
    threads' steps go on to the installed display, if any."""
    stack = _observers.__dict__.setdefault("stack", [])
    stack.append(observer)
    try:
        yield
    finally:
        stack.remove(observer)


@contextlib.contextmanager
def progress(total: int | None, what: str, unit: str = "images") -> Iterator[Step]:
    """A step of `total` units (None: not known up front) named `what`; call `update(n)` as they are done."""
    step = Step(total, what, unit)
    try:
        yield step
    finally:
        step.close()


def track(items: Iterable[T], what: str, unit: str = "images", total: int | None = None) -> Iterator[T]:
    """Yield `items`, counting each one as done. `total` defaults to `len(items)` where it has one.

    For a loop that runs to its end; when the consumer may stop early (an error, a break), use
    `with progress(...) as step:` and `step.count(items)` so the step ends with the block."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress(total, what, unit) as step:
        for item in items:
            yield item
            step.update()


# ---- shown by the application --------------------------------------------------------------------
def describe(what: str, done: int, total: int | None, unit: str, *, rate: float | None = None,
             elapsed: float | None = None, finished: bool = False) -> str:
    """One plain progress line: `index: 1,200/10,000 images (12%), 85/s, ETA 1m43s`; when finished,
    the time taken instead of the ETA."""
    if total:
        text = f"{what}: {done:,}/{total:,} {unit} ({min(100, math.floor(100 * done / total))}%)"
    else:
        text = f"{what}: {done:,} {unit}"
    if rate:
        text += f", {rate:,.0f}/s" if rate >= 10 else f", {rate:.1f}/s"
    if finished and elapsed is not None:
        text += f", in {_duration(elapsed)}"
    elif total and rate and done < total:
        text += f", ETA {_duration((total - done) / rate)}"
    return text


def _duration(seconds: float) -> str:
    """45s, 1m43s, 2h05m: short enough for a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _interval() -> float:
    value = os.environ.get(INTERVAL_VARIABLE, "")
    try:
        seconds = float(value) if value else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL  # a bad value must not stop a command; the default is sensible
    return seconds if math.isfinite(seconds) and seconds >= 0 else DEFAULT_INTERVAL


class _Display:
    """Opens a tqdm bar (terminal) or a plain-line reporter (anything else) for each step."""

    def __init__(self, stream: IO[str] | None, mode: str) -> None:
        self.stream, self.mode = stream, mode

    def open(self, total: int | None, what: str, unit: str) -> _Shown | None:
        stream = self.stream if self.stream is not None else sys.stderr  # looked up late: CliRunner swaps it
        interval = _interval()
        mode = self.mode_for(stream)
        kwargs = dict(total=total, desc=what, file=stream)
        if mode == "bar":
            # Follow the terminal's width as it is resized; a terminal that reports no width (a bare
            # pty) would get an empty bar, so it gets a fixed one.
            size = {"dynamic_ncols": True} if _columns(stream) >= 20 else {"ncols": 100, "nrows": 20}
            return _bar_class()(unit=f" {unit}", delay=min(SHORTEST_SHOWN, interval), **size, **kwargs)
        if mode == "lines":
            # The first line after one interval: a step shorter than that leaves no line in a log
            # (the command's own summary says how it went).
            return _lines_class()(unit=unit, delay=interval, mininterval=interval, miniters=1, leave=False, **kwargs)
        return None

    def mode_for(self, stream: IO[str]) -> str:
        return self.mode if self.mode != "auto" else ("bar" if _is_terminal(stream) else "lines")


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def echo(line: str) -> None:
    """For the application: write a line of its own (`skipped FILE: why`) to the progress stream
    while a step may be shown; a bar is cleared first and drawn again below the line (tqdm.write)."""
    stream = (_display.stream if _display is not None else None) or sys.stderr
    if _display is not None and _display.mode_for(stream) == "bar":
        _bar_class().write(line, file=stream)
    else:
        stream.write(line + "\n")
        stream.flush()


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


@contextlib.contextmanager
def showing_progress(stream: IO[str] | None = None, mode: str | None = None) -> Iterator[None]:
    """Show every step reported inside the block on `stream` (default: stderr at the time).

    mode: auto (a bar on a terminal, plain lines elsewhere), bar, lines or off; default from the
    `DINOSEEK_PROGRESS` environment variable, else auto. With a bar, log lines are routed around it
    (tqdm's logging_redirect_tqdm) so they don't break it.
    """
    global _display
    mode = (mode or os.environ.get(MODE_VARIABLE) or "auto").strip().lower()
    if mode not in ("auto", "bar", "lines", "off"):
        mode = "auto"  # an unknown value must not stop a command
    display = _Display(stream, mode)
    previous, _display = _display, display
    try:
        with contextlib.ExitStack() as stack:
            if display.mode_for(stream if stream is not None else sys.stderr) == "bar":
                # Plain lines and log lines are both whole lines; a bar must be cleared around a log line.
                from tqdm.contrib.logging import logging_redirect_tqdm

                stack.enter_context(logging_redirect_tqdm(tqdm_class=_bar_class()))
            yield
    finally:
        _display = previous


# The tqdm classes are built on first use: importing this module must not import tqdm.
_classes: dict[str, type] = {}


def _bar_class() -> type:
    if "bar" not in _classes:
        from tqdm import tqdm

        class _Bar(tqdm):
            """tqdm's bar; no monitor thread (the indexer forks decode workers while a bar is open)."""

            monitor_interval = 0

        _classes["bar"] = _Bar
    return _classes["bar"]


def _lines_class() -> type:
    if "lines" not in _classes:
        from tqdm import tqdm

        class _Lines(tqdm):
            """Whole lines instead of a redrawn bar (a log file, a pipe, CI): tqdm keeps the counts,
            the rate and the time between lines (`mininterval`); `display` is the documented place
            to change how a state is shown."""

            monitor_interval = 0

            def display(self, msg=None, pos=None) -> bool:
                if msg == "":  # tqdm clearing the bar at close: lines are never cleared
                    return False
                if self.total and self.n >= self.total:
                    return True  # the last count: close() writes it with the time taken
                self._write_line(finished=False)
                return True

            def close(self) -> None:
                # The final count and the time taken, for a step that was shown at all.
                if not self.disable and getattr(self, "_shown_once", False):
                    self._write_line(finished=True)
                super().close()

            def _write_line(self, finished: bool) -> None:
                state = self.format_dict  # also before tqdm has set its start time (a first line at 0)
                elapsed = state["elapsed"]
                rate = self.n / elapsed if finished and elapsed > 0 else state["rate"]
                self.fp.write(describe(self.desc, self.n, self.total, self.unit, rate=rate, elapsed=elapsed,
                                       finished=finished) + "\n")
                self.fp.flush()
                self._shown_once = True

        _classes["lines"] = _Lines
    return _classes["lines"]
