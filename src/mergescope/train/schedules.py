"""Learning-rate schedules as multipliers of the peak lr, per optimizer step; a registry by name."""

from __future__ import annotations

import math
from typing import Callable

from mergescope.errors import MergescopeError

# (step, total_steps, warmup_steps, milestones, gamma) -> lr multiplier; step counts from 0.
ScheduleFn = Callable[[int, int, int, tuple[float, ...], float], float]

_SCHEDULES: dict[str, ScheduleFn] = {}


def register_schedule(name: str) -> Callable[[ScheduleFn], ScheduleFn]:
    """Decorator registering a schedule function under ``name``."""

    def decorator(fn: ScheduleFn) -> ScheduleFn:
        _SCHEDULES[name] = fn
        return fn

    return decorator


def list_schedules() -> list[str]:
    """Names of the registered schedules, sorted."""
    return sorted(_SCHEDULES)


def get_schedule(name: str) -> ScheduleFn:
    """The schedule called ``name``; unknown names raise MergescopeError listing the known ones."""
    if name not in _SCHEDULES:
        raise MergescopeError(f"unknown lr schedule '{name}'; known schedules: {', '.join(list_schedules())}")
    return _SCHEDULES[name]


def _warmup(step: int, warmup_steps: int) -> float:
    """Linear ramp reaching 1 at the end of warmup (never 0, so the first step moves)."""
    return (step + 1) / warmup_steps


@register_schedule("onecycle")
def onecycle(step: int, total: int, warmup_steps: int, milestones: tuple[float, ...], gamma: float) -> float:
    """Linear warmup to the peak, then linear decay towards 0 at the last step."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return max(0.0, (total - step) / max(1, total - warmup_steps))


@register_schedule("cosine")
def cosine(step: int, total: int, warmup_steps: int, milestones: tuple[float, ...], gamma: float) -> float:
    """Linear warmup to the peak, then half a cosine down to 0."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@register_schedule("step")
def step_decay(step: int, total: int, warmup_steps: int, milestones: tuple[float, ...], gamma: float) -> float:
    """Linear warmup, then the peak multiplied by ``gamma`` at each milestone (a fraction of training)."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    passed = sum(step >= m * total for m in milestones)
    return gamma**passed


@register_schedule("constant")
def constant(step: int, total: int, warmup_steps: int, milestones: tuple[float, ...], gamma: float) -> float:
    """Linear warmup, then the peak lr throughout."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return 1.0
