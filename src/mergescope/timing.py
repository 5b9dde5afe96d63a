"""Where a run's time went: seconds by stage, recorded by the data passes and the studies, printed at the end.

The stages (:data:`STAGES`): ``decode`` (opening the dataset — a pack or a small tree is decoded then — and
waiting for the next batch: reading, decoding, resizing), ``transfer``
(host to device), ``forward`` (the models), ``statistics`` (what a pass accumulates: moments, correlations, D′),
``top-k`` (the probe's streaming top-k), ``assignment`` (alignment outside the data passes: the assignment
problems, weight matching), ``analysis`` (a comparison's own metrics after the passes: Kendall's τ, CLIP-δ, the
null, the categories), ``training`` (the optimiser's loop), ``rendering`` (pages and figures), ``writing``
(results and checkpoints to disk). Stages nest and are exclusive: the seconds of a stage opened inside another are
not counted twice, so ``assignment`` around a matching call holds what its data pass (``decode``, ``forward``,
``statistics``) does not.

Times are charged to the innermost open :func:`timed` scope (a process-wide one when none is open). On CUDA a
stage given its ``device`` synchronises it before stopping the clock, so kernels are charged to the stage that
queued them.

Example:
    >>> with timed() as times:
    ...     with stage("forward"):
    ...         model(x)
    >>> print(times.line())   # time 0.3 s: forward 0.3 s (98%) · other 0.0 s
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

STAGES = ("decode", "transfer", "forward", "statistics", "top-k", "assignment", "analysis", "training", "rendering",
          "writing")


class StageTimes:
    """Seconds by stage since this object was made; :meth:`stage` times a block, exclusively of nested stages."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._open: list[list[Any]] = []  # [name, since] of each open stage, innermost last

    @contextmanager
    def stage(self, name: str, device: Any = None) -> Iterator[None]:
        """Charge the block's time to ``name`` (pausing the enclosing stage); ``device``: synchronise it if CUDA."""
        now = time.perf_counter()
        if self._open:
            self._charge(now)
        self._open.append([name, now])
        try:
            yield
        finally:
            if device is not None and str(device).startswith("cuda"):
                import torch

                torch.cuda.synchronize(device)
            now = time.perf_counter()
            self._charge(now)
            self._open.pop()
            if self._open:
                self._open[-1][1] = now  # the enclosing stage resumes now

    def _charge(self, now: float) -> None:
        top = self._open[-1]
        self.seconds[top[0]] = self.seconds.get(top[0], 0.0) + now - top[1]
        top[1] = now

    def snapshot(self) -> tuple[float, dict[str, float]]:
        """(now, seconds by stage so far), open stages included up to now."""
        now = time.perf_counter()
        if self._open:
            self._charge(now)
        return now, dict(self.seconds)

    def record(self, since: tuple[float, dict[str, float]] | None = None) -> dict:
        """``{"total_s", "stages": {stage: s}, "other_s"}`` since ``since`` (a :meth:`snapshot`; default: the start),
        stages in :data:`STAGES` order then any others, rounded to ms; ``other_s`` is what the rounded stages leave of
        the rounded total."""
        start, before = since if since is not None else (self.started, {})
        now, seconds = self.snapshot()
        spent = {k: v - before.get(k, 0.0) for k, v in seconds.items()}
        names = [s for s in STAGES if s in spent] + sorted(set(spent) - set(STAGES))
        stages = {s: round(spent[s], 3) for s in names if spent[s] > 0}
        total = round(now - start, 3)
        # the rest is taken from the rounded numbers, so that the record adds up to its total (per-stage rounding
        # alone could leave the parts up to 0.5 ms each above it)
        other = round(max(0.0, total - sum(stages.values())), 3)
        return {"total_s": total, "stages": stages, "other_s": other}

    def line(self) -> str:
        """One line for the end of a command: total, then each stage with its share, then the rest."""
        return format_record(self.record())


def format_record(record: dict) -> str:
    """``time 12.3 s: forward 5.1 s (41%) · statistics 2.0 s (16%) · other 0.4 s`` from a
    :meth:`StageTimes.record`."""
    total = record["total_s"]
    parts = [f"{name} {s:.1f} s ({100 * s / total:.0f}%)" if total > 0 else f"{name} {s:.1f} s"
             for name, s in record["stages"].items()]
    return f"time {total:.1f} s: " + " · ".join([*parts, f"other {record['other_s']:.1f} s"])


_ROOT = StageTimes()
_current: ContextVar[StageTimes | None] = ContextVar("mergescope_stage_times", default=None)


def current() -> StageTimes:
    """The innermost open :func:`timed` scope (the process-wide one when none is open)."""
    return _current.get() or _ROOT


@contextmanager
def timed() -> Iterator[StageTimes]:
    """A scope whose stages are counted apart (a command); on exit they are added to the enclosing scope too.
    Open it outside any stage."""
    outer, times = current(), StageTimes()
    token = _current.set(times)
    try:
        yield times
    finally:
        _current.reset(token)
        for name, s in times.snapshot()[1].items():
            outer.seconds[name] = outer.seconds.get(name, 0.0) + s


def stage(name: str, device: Any = None):
    """Time a block as stage ``name`` of the current scope (see :meth:`StageTimes.stage`)."""
    return current().stage(name, device)


def staged(name: str) -> Callable[[F], F]:
    """Decorator: every call of the function is stage ``name`` (e.g. ``@staged("rendering")`` on a page writer)."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def timed_call(*args, **kwargs):
            with stage(name):
                return fn(*args, **kwargs)
        return timed_call  # type: ignore[return-value]
    return wrap


def since_here():
    """A mark for :func:`record_since`: what a run folder's manifest records is the time after it."""
    return current().snapshot()


def record_since(mark) -> dict:
    """The current scope's :meth:`~StageTimes.record` since ``mark`` (:func:`since_here`)."""
    return current().record(mark)


__all__ = ["STAGES", "StageTimes", "current", "format_record", "record_since", "since_here", "stage", "staged", "timed"]
