"""Reports of a merge run: interpolation barriers, figures and a self-contained HTML page.

The names below are loaded on first use (PEP 562), so that a command which renders no figure — the probe's
feature pages draw their histograms as SVG — does not import matplotlib.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {  # name -> the module of this package that defines it
    "ALPHA_LABEL": "figures",
    "interpolation_figures": "figures",
    "method_colors": "figures",
    "plot_interpolation": "figures",
    "headline": "headline",
    "render_report": "html",
    "report_context": "html",
    "COLUMNS": "interpolation",
    "barriers": "interpolation",
    "curves": "interpolation",
    "read_csv": "interpolation",
    "write_csv": "interpolation",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
