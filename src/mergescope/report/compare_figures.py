"""Figures of the channel comparison: per-layer metric histograms (SVG) and partial-merge curves (PNG, Agg)."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mergescope.runs.atomic import atomic_path, atomic_write_text
from mergescope.report.figures import DPI, _plain
from mergescope.report.svg_histograms import Panel, Series, histogram_panels

HISTOGRAM_BINS = 20
METRIC_RANGES = {"kendall_tau": (-1.0, 1.0), "overlap": (0.0, 1.0), "correlation": (-1.0, 1.0), "clip_delta": None}
_PAIR_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
_METRIC_COLORS = {"kendall_tau": "#1f77b4", "clip_delta": "#d62728", "overlap": "#2ca02c", "correlation": "#9467bd"}


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(path)


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
        panels.append(Panel(titles.get(metric, metric), series))
    return atomic_write_text(path, histogram_panels(panels, suptitle))


def plot_partial_merge(rows: Sequence[Mapping], path: str | os.PathLike, labels: Mapping[str, str] | None = None,
                       title: str = "") -> Path:
    """Accuracy against the share of merged channels: left panel "most similar first", right panel "least similar
    first", one line per metric; in both the random baseline as its mean over seeds with a min–max band.

    Args:
        rows: :func:`mergescope.merge.partial_merge_curves` rows.
        labels: metric -> legend name (e.g. ``{"clip_delta": "fallback-δ"}``).
    """
    labels = dict(labels or {})
    fig = Figure(figsize=(11, 4.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    random = [r for r in rows if r["metric"] == "random"]
    metrics = list(dict.fromkeys(r["metric"] for r in rows if r["metric"] != "random"))
    for ax, direction in zip(axes, ("top", "bottom")):
        if random:
            fr = sorted({r["fraction"] for r in random})
            acc = np.array([[r["accuracy"] for r in random if r["fraction"] == f] for f in fr]) * 100  # [F,seeds]
            ax.fill_between(np.array(fr) * 100, acc.min(1), acc.max(1), color="#999999", alpha=0.25, lw=0)
            ax.plot(np.array(fr) * 100, acc.mean(1), color="#555555", lw=2, ls="--",
                    label=f"random channels ({acc.shape[1]} seeds: mean, min–max)")
        for metric in metrics:
            curve = sorted((r for r in rows if r["metric"] == metric and r["direction"] == direction),
                           key=lambda r: r["fraction"])
            if curve:
                ax.plot([r["fraction"] * 100 for r in curve], [r["accuracy"] * 100 for r in curve],
                        color=_METRIC_COLORS.get(metric, "#17becf"), lw=1.8, marker="o", ms=3,
                        label=_plain(labels.get(metric, metric)))
        ax.set_title("most similar channels merged first" if direction == "top"
                     else "least similar channels merged first", fontsize=11)
        ax.set_xlabel("channels merged per layer (%): 0 = model A, 100 = full merge")
        ax.set_xlim(-2, 102)
        ax.grid(True, alpha=0.35)
        ax.legend(fontsize=8, frameon=False, loc="lower left")
    axes[0].set_ylabel("accuracy (%)")
    if title:
        fig.suptitle(_plain(title), fontsize=12)
    return _save(fig, path)


__all__ = ["plot_metric_histograms", "plot_partial_merge"]
