"""Reports of a merge run: interpolation barriers, figures (SVG) and a self-contained HTML page."""
from __future__ import annotations

from mergescope.report.figures import ALPHA_LABEL, interpolation_figures, method_colors, plot_interpolation
from mergescope.report.headline import headline
from mergescope.report.html import render_report, report_context
from mergescope.report.interpolation import COLUMNS, barriers, curves, read_csv, write_csv

__all__ = sorted(["ALPHA_LABEL", "COLUMNS", "barriers", "curves", "headline", "interpolation_figures",
                  "method_colors", "plot_interpolation", "read_csv", "render_report", "report_context", "write_csv"])
