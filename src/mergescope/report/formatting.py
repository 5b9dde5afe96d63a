"""Number formatting shared by the headline and the HTML tables."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

MISSING = "—"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def percent(fraction, digits: int = 1) -> str:
    """0.931 → ``"93.1%"``; NaN/None → an em dash."""
    return f"{100 * fraction:.{digits}f}%" if _finite(fraction) else MISSING


def points(fraction, digits: int = 1) -> str:
    """An accuracy difference as signed percentage points: 0.012 → ``"+1.2 pts"``."""
    return f"{100 * fraction:+.{digits}f} pts" if _finite(fraction) else MISSING


def number(x, digits: int = 4) -> str:
    """A compact float with ``digits`` significant digits; non-finite values as text, None as a dash."""
    if x is None:
        return MISSING
    if isinstance(x, float) and not math.isfinite(x):
        return MISSING if math.isnan(x) else ("∞" if x > 0 else "−∞")
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def alpha(x) -> str:
    """An interpolation coefficient: 0.5 → ``"0.5"``, 0.05 → ``"0.05"``."""
    return f"{x:.4g}" if _finite(x) else MISSING


def value(v) -> str:
    """A free-form summary value: lists joined by commas, mappings as compact JSON, floats via :func:`number`."""
    if isinstance(v, (list, tuple)):
        return ", ".join(value(x) for x in v)
    if isinstance(v, Mapping):
        return json.dumps(v, sort_keys=True, default=str)
    if isinstance(v, float):
        return number(v)
    return MISSING if v is None else str(v)
