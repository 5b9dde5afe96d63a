"""Result tables as CSV — the project's one CSV writer: written atomically, floats in shortest round-trip form,
never NaN (±inf, e.g. the loss of a diverged merge, is written as ``inf``)."""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .atomic import atomic_path
from ..errors import MergescopeError


def cell(value) -> object:
    """A CSV cell: floats as ``repr`` (round-trips), flags as ``true``/``false``, None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return value


def write_rows(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[Mapping]) -> Path:
    """Write ``rows`` (missing keys as empty cells) under the header ``columns`` atomically; return the path.

    A NaN is refused with a one-line error naming its column: a result table never holds NaN.
    """
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            for col in columns:
                v = r.get(col)
                if isinstance(v, float) and math.isnan(v):
                    raise MergescopeError(f"NaN {col} in a result row: {dict(r)}")
            writer.writerow([cell(r.get(col)) for col in columns])
    return Path(path)
