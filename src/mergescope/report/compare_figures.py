"""Figures of the channel comparison (SVG): per-layer metric histograms and partial-merge curves."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from mergescope.runs.atomic import atomic_write_text
from mergescope.report.svg_histograms import Panel as HistogramPanel
from mergescope.report.svg_histograms import Series, histogram_panels
from mergescope.report.svg_plot import Band, Figure, Line, Panel

HISTOGRAM_BINS = 20
METRIC_RANGES = {"kendall_tau": (-1.0, 1.0), "overlap": (0.0, 1.0), "correlation": (-1.0, 1.0), "clip_delta": None}
_PAIR_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
_METRIC_COLORS = {"kendall_tau": "#1f77b4", "clip_delta": "#d62728", "overlap": "#2ca02c", "correlation": "#9467bd"}


def plot_metric_histograms(values: Mapping[str, Mapping[str, np.ndarray]], titles: Mapping[str, str],
                           path: str | os.PathLike, suptitle: str = "") -> Path:
    """One panel per metric, one step histogram (20 bins over the metric's range) per pair, usable channels only;
    written as SVG (:func:`mergescope.report.svg_histograms.histogram_panels`: milliseconds where matplotlib took
    ~1 s a layer).

    Args:
        values: metric -> pair label -> float [n] (the usable values of one layer).
        titles: metric -> panel title (e.g. ``"Kendall τ on D′ (50 images)"``).
        path: SVG to write.
    """
    panels = []
    for metric in (m for m in values if any(len(v) for v in values[m].values())):
        series = []
        for i, (label, v) in enumerate(values[metric].items()):
            if not len(v):
                continue
            lo_hi = METRIC_RANGES.get(metric)
            if lo_hi is None:
                lo, hi = float(np.min(v)), float(np.max(v))
                lo_hi = (lo, hi if hi > lo else lo + 1e-6)
            counts, edges = np.histogram(v, bins=HISTOGRAM_BINS, range=lo_hi)
            series.append(Series(label, _PAIR_COLORS[i % len(_PAIR_COLORS)], counts, edges))
        panels.append(HistogramPanel(titles.get(metric, metric), series))
    return atomic_write_text(path, histogram_panels(panels, suptitle))


def plot_partial_merge(rows: Sequence[Mapping], path: str | os.PathLike, labels: Mapping[str, str] | None = None,
                       title: str = "") -> Path:
    """Accuracy against the share of merged channels: left panel "most similar first", right panel "least similar
    first", one line per metric; in both the random baseline as its mean over seeds with a min–max band (SVG).

    Args:
        rows: :func:`mergescope.merge.partial_merge_curves` rows.
        labels: metric -> legend name (e.g. ``{"clip_delta": "fallback-δ"}``).
    """
    labels = dict(labels or {})
    random = [r for r in rows if r["metric"] == "random"]
    metrics = list(dict.fromkeys(r["metric"] for r in rows if r["metric"] != "random"))
    chance: list = []
    if random:
        fr = sorted({r["fraction"] for r in random})
        acc = np.array([[r["accuracy"] for r in random if r["fraction"] == f] for f in fr]) * 100  # [F, seeds]
        x = [f * 100 for f in fr]
        chance = [Band(x, list(acc.min(1)), list(acc.max(1)), "#999999"),
                  Line(x, list(acc.mean(1)), "#555555", width=2.5, dash=(3, 1.5),
                       label=f"random channels ({acc.shape[1]} seeds: mean, min–max)")]
    panels = []
    for direction in ("top", "bottom"):
        items = list(chance)
        for metric in metrics:
            curve = sorted((r for r in rows if r["metric"] == metric and r["direction"] == direction),
                           key=lambda r: r["fraction"])
            if curve:
                name = labels.get(metric, metric)
                x, y = [r["fraction"] * 100 for r in curve], [r["accuracy"] * 100 for r in curve]
                items.append(Line(x, y, _METRIC_COLORS.get(metric, "#17becf"), width=2.2, marker="o", size=5,
                                  label=name, tips=[f"{name}: {a:g}% merged, accuracy {b:.2f}%" for a, b in zip(x, y)]))
        panels.append(Panel(items, "most similar channels merged first" if direction == "top"
                            else "least similar channels merged first",
                            "channels merged per layer (%): 0 = model A, 100 = full merge", "accuracy (%)",
                            xlim=(-2, 102), legend="lower left"))
    lo, hi = _shared_range(panels)
    panels = [replace(p, ylim=(lo, hi)) for p in panels]  # both panels on one accuracy scale
    return atomic_write_text(path, Figure(panels, 600, 420, title).svg())


def _shared_range(panels: Sequence[Panel]) -> tuple[float, float]:
    """The y range (with margins) that holds every panel's values."""
    values = [v for p in panels for it in p.items for v in (list(it.y) if isinstance(it, Line) else [*it.lo, *it.hi])
              if v == v]
    if not values:
        return 0.0, 100.0
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo) or 1.0
    return lo - pad, hi + pad


__all__ = ["plot_metric_histograms", "plot_partial_merge"]
