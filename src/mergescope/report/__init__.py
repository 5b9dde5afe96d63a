"""Reports of a merge run: interpolation barriers, figures and a self-contained HTML page.

The figures' names are loaded on first use (PEP 562), so that a command which draws no figure — the probe's
feature pages draw their histograms as SVG — does not import matplotlib.
"""
from __future__ import annotations

import importlib
from typing import Any

from mergescope.report.headline import headline
from mergescope.report.html import render_report, report_context
from mergescope.report.interpolation import COLUMNS, barriers, curves, read_csv, write_csv

_FIGURES = ("ALPHA_LABEL", "interpolation_figures", "method_colors", "plot_interpolation")  # need matplotlib

__all__ = sorted(["COLUMNS", "barriers", "curves", "headline", "read_csv", "render_report", "report_context",
                  "write_csv", *_FIGURES])


def __getattr__(name: str) -> Any:
    if name not in _FIGURES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".figures", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FIGURES))
