"""The single-page HTML report of a run: headline, figures and tables, rendered with jinja2."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import jinja2
from markupsafe import Markup

from mergescope.errors import MergescopeError
from mergescope.report import figures as curve_figures
from mergescope.report import formatting as fmt
from mergescope.runs.atomic import atomic_write_text
from mergescope.runs.jsonio import package_version
from mergescope.timing import staged
from mergescope.report.headline import direct_average, headline, lowest_barrier
from mergescope.report.interpolation import barriers, curves, methods, splits

REPORT_NAME = "report.html"
FIGURES_DIR = "figures"


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mergescope.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(percent=fmt.percent, points=fmt.points, number=fmt.number, alpha=fmt.alpha, value=fmt.value)
    return env


def _rows(results: Mapping) -> list[dict]:
    if not isinstance(results, Mapping):
        raise MergescopeError(f"report results must be a mapping, got {type(results).__name__}")
    rows = results.get("rows")
    if not rows:
        if results.get("sections"):
            return []  # a run without an interpolation study (e.g. a feature study): sections only
        raise MergescopeError("report results have no interpolation rows")
    return [row for curve in curves(rows).values() for row in curve]


def _records(items, keys: tuple[str, ...]) -> list[dict]:
    """Table records with exactly ``keys`` (absent ones become None, shown as a dash)."""
    return [{k: item.get(k) for k in keys} for item in items or ()]


def report_context(results: Mapping, figures: list[Path], run_dir: Path) -> dict:
    """Everything the template shows, computed from ``results`` (figures given as paths under ``run_dir``)."""
    from mergescope.report.figures import method_colors  # figures import this module's page helpers

    rows = _rows(results)
    stats = barriers(rows, results.get("endpoints"), results.get("corrections")) if rows else []
    colors = curve_figures.method_colors(methods(rows)) if rows else {}
    split = splits(rows)[0] if rows else None
    # the card tagged "best" is the headline's: the smallest accuracy barrier (Q1), not the best midpoint
    best = lowest_barrier(stats, split) if rows else None
    baseline = direct_average(stats, split) if rows else None
    order = {s: i for i, s in enumerate(splits(rows))} if rows else {}
    cards = [{**s, "color": colors[s["method"]],
              "role": "best" if s is best else "baseline" if s is baseline else ""}
             for s in stats if s["split"] == split]
    return {
        "title": str(results.get("title") or "mergescope report"),
        "headline": headline(rows, results.get("endpoints") or (), split) if rows else str(results.get("headline", "")),
        "headline_split": split,
        "cards": cards,
        "figures": [{"src": p.relative_to(run_dir).as_posix(), "split": s} for p, s in zip(figures, splits(rows))],
        "barriers": sorted(({**s, "color": colors[s["method"]]} for s in stats), key=lambda s: order[s["split"]]),
        "endpoints": _records(results.get("endpoints"), ("model", "split", "loss", "accuracy")),
        "matching": _records(results.get("matching"), ("group", "size", "mean_correlation", "dead_a", "dead_b")),
        "sections": [{"title": str(s.get("title", "")), "html": Markup(s.get("html", ""))}
                     for s in results.get("sections") or ()],
        "rows": sorted(rows, key=lambda r: (order[r["split"]], r["method"], r["alpha"])),
        "colors": colors,
        "summary": dict(results.get("summary") or {}),
        "version": package_version(),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


@staged("rendering")
def render_report(run_dir: str | os.PathLike, results: Mapping) -> Path:
    """Write ``run_dir/report.html`` (atomically) and its figures under ``run_dir/figures/``; return the page's path.

    ``results`` holds ``title``, ``summary`` (free key/values), ``endpoints`` (model, split, loss, accuracy),
    ``rows`` (interpolation rows) and optionally ``matching`` (group, size, mean_correlation, dead_a, dead_b)
    and ``sections`` (title, html: trusted HTML fragments inserted as-is). If anything fails, no
    ``report.html`` is written (an existing one is left unchanged).
    """
    run_dir = Path(run_dir)
    rows = _rows(results)
    colors = curve_figures.method_colors(methods(rows))
    figures = curve_figures.interpolation_figures(rows, run_dir / FIGURES_DIR, colors) if rows else []
    page = _environment().get_template(REPORT_NAME).render(report_context(results, figures, run_dir))
    return atomic_write_text(run_dir / REPORT_NAME, page)
