"""Value checks for the command line, applied where an option enters (argparse ``type=``).

Each returns the parsed value or raises ``argparse.ArgumentTypeError`` with what is allowed; the CLI's parser
turns that into one line ``error: argument --name: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _within(value, ok: bool, allowed: str):
    if not ok:
        raise argparse.ArgumentTypeError(f"{value:g} is not allowed: must be {allowed}")
    return value


def positive_int(text: str) -> int:
    """An integer ≥ 1 (batch sizes, image counts, k, epochs)."""
    value = _number(text, int)
    return _within(value, value >= 1, "at least 1")


def seed(text: str) -> int:
    """An integer ≥ 0 (random seeds: numpy's generators refuse negative ones)."""
    value = _number(text, int)
    return _within(value, value >= 0, ">= 0")


def finite_float(text: str) -> float:
    """Any finite number (no nan, no inf)."""
    return _number(text, float)


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates)."""
    value = _number(text, float)
    return _within(value, value > 0, "> 0")


def nonnegative_float(text: str) -> float:
    """A finite number ≥ 0 (ridges)."""
    value = _number(text, float)
    return _within(value, value >= 0, ">= 0")


def unit_float(text: str) -> float:
    """A number in [0, 1] (interpolation weights α, quantiles, shares)."""
    value = _number(text, float)
    return _within(value, 0 <= value <= 1, "between 0 and 1")


def alpha_step(text: str) -> float:
    """The α grid's step: in (0, 1] and dividing 1 into whole steps (0.05, 0.1, 0.25, 0.5, 1...), so the grid
    holds both endpoints at equal spacing."""
    value = _number(text, float)
    steps = round(1 / value) if value > 0 else 0
    if not 0 < value <= 1 or abs(steps * value - 1) > 1e-9:
        raise argparse.ArgumentTypeError(f"{value:g} is not allowed: must be 1/n for a whole n >= 1 "
                                         "(e.g. 0.05, 0.1, 0.25, 0.5)")
    return value


def json_object(text: str) -> dict:
    """A JSON object of keyword arguments, e.g. ``{"width": 4}``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({e.msg}); e.g. '{{\"width\": 4}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; e.g. '{{\"width\": 4}}'")
    return value


def device(text: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:N, mps."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r} is not supported (cpu, cuda, cuda:N, mps)")
    return text


def workers(text: str) -> int | None:
    """``auto`` (None: one per CPU) or an integer ≥ 0 (decoding worker processes; 0: in the main process)."""
    if text == "auto":
        return None
    value = _number(text, int)
    return _within(value, value >= 0, "at least 0, or auto")


def device_or_auto(text: str) -> str:
    """``auto`` (resolved when the command runs: cuda when available, else cpu) or a :func:`device`."""
    return text if text == "auto" else device(text)


def resolve_device(text: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; any other device as given."""
    if text != "auto":
        return text
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``error: <command>: <message>``, exit status 2."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        self.exit(2, f"error: {self.prog}: {message}\n")
