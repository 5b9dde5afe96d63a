"""Interpolation-curve figures: one SVG per split (:mod:`mergescope.report.svg_plot`), accuracy and loss against α."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from markupsafe import Markup, escape

from mergescope.runs.atomic import atomic_write_text
from mergescope.timing import staged
from mergescope.report.interpolation import curves, methods, splits
from mergescope.report.svg_plot import Figure, Line, Panel, Rule

ALPHA_LABEL = "α (0 = model B, 1 = model A)"
_KNOWN_COLORS = {
    "naive": "#7f7f7f",
    "permuted": "#1f77b4",
    "permuted+repair": "#2ca02c",
    "permuted+reset": "#ff7f0e",
}
_SPARE_COLORS = ("#9467bd", "#d62728", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_LOG_LOSS_RATIO = 30.0
# the i-th method of a figure: its dash pattern (in line widths) and marker (cycled), and a line and marker each a
# little thinner and smaller than the one before, which is drawn below it, so that methods with the same curve (e.g.
# REPAIR and RESET on a BatchNorm net) all stay visible
_DASHES = ((), (5, 2), (1, 1.2), (6, 2, 1, 2), (9, 3), (3, 1, 1, 1, 1, 1))
_MARKERS = ("o", "s", "^", "D", "v", "P")
_ENDPOINT = 12.0  # px: the outlined markers at α = 0 and α = 1


def method_colors(names: Sequence[str]) -> dict[str, str]:
    """A fixed hex colour per method: the usual methods always get the same one, others share a spare cycle."""
    colors = {n: _KNOWN_COLORS[n.lower()] for n in names if n.lower() in _KNOWN_COLORS}
    others = [n for n in names if n not in colors]
    for i, name in enumerate(others):
        colors[name] = _SPARE_COLORS[i % len(_SPARE_COLORS)]
    return colors


def _lines(split_curves: Mapping[str, list[dict]], key: str, scale: float, unit: str,
           colors: Mapping[str, str]) -> list:
    """A panel's items: the α = 0.5 rule, each method's line (:data:`_DASHES`, :data:`_MARKERS`, thinner each),
    then every method's endpoints as large outlined markers above all lines."""
    items: list = [Rule(0.5, "#bbbbbb", 1.2, (1, 2))]
    ends = []
    for i, (method, curve) in enumerate(split_curves.items()):
        alphas = [r["alpha"] for r in curve]
        values = [r[key] * scale for r in curve]
        tips = [f"{method}: α = {a:g}, {key} {v:.4g}{unit}" for a, v in zip(alphas, values)]
        items.append(Line(alphas, values, colors[method], width=max(1.5, 4.5 - 0.5 * i), dash=_DASHES[i % 6],
                          marker=_MARKERS[i % 6], size=max(4.0, 9.5 - 1.2 * i), label=method, tips=tips))
        at = [k for k, a in enumerate(alphas) if min(abs(a), abs(a - 1)) <= 1e-6]
        ends.append(Line([alphas[k] for k in at], [values[k] for k in at], colors[method], marker="o",
                         size=_ENDPOINT, edge="#000", stroke=False, tips=[tips[k] for k in at]))
    return items + ends


def plot_interpolation(rows: Iterable[Mapping], split: str, path: str | os.PathLike,
                       colors: Mapping[str, str] | None = None) -> Path:
    """Save a two-panel SVG (accuracy vs α, loss vs α; one line per method) for ``split``; return ``path``.

    Each method has its own dash pattern and marker, each drawn thinner than the one before and above it, so that
    methods with the same curve all stay visible. Endpoints (α = 0 and α = 1) are drawn as large outlined markers.
    The loss axis switches to a log scale when the losses span more than a factor of 30. Every marker's tooltip is
    its exact value.
    """
    rows = list(rows)
    colors = dict(colors) if colors is not None else method_colors(methods(rows))
    split_curves = {m: c for (m, s), c in curves(rows).items() if s == split}
    losses = [r["loss"] for c in split_curves.values() for r in c if r["loss"] == r["loss"] and r["loss"] < 1e308]
    log = bool(losses) and min(losses) > 0 and max(losses) / min(losses) > _LOG_LOSS_RATIO
    ticks = (0, 0.25, 0.5, 0.75, 1)
    key = Line([], [], "#fff", marker="o", size=_ENDPOINT, edge="#000", stroke=False, label="endpoints (B, A)")
    acc = Panel(_lines(split_curves, "accuracy", 100.0, "%", colors), "Accuracy", ALPHA_LABEL,
                f"{split} accuracy (%)", xlim=(-0.03, 1.03), xticks=ticks)
    loss = Panel([*_lines(split_curves, "loss", 1.0, "", colors), key], "Loss" + (" (log scale)" if log else ""),
                 ALPHA_LABEL, f"{split} loss", xlim=(-0.03, 1.03), xticks=ticks, ylog=log)
    title = Markup("Interpolation θ(α) = α θ<tspan baseline-shift='sub' font-size='12'>A</tspan> + (1 − α) "
                   "P(θ<tspan baseline-shift='sub' font-size='12'>B</tspan>) — {} split").format(escape(split))
    return atomic_write_text(path, Figure([acc, loss], 600, 400, title, legend="bottom").svg())


@staged("rendering")
def interpolation_figures(rows: Iterable[Mapping], out_dir: str | os.PathLike,
                          colors: Mapping[str, str] | None = None) -> list[Path]:
    """One ``interpolation_<split>.svg`` per split in ``out_dir`` (test first, then train, then others)."""
    rows = list(rows)
    colors = dict(colors) if colors is not None else method_colors(methods(rows))
    paths: list[Path] = []
    for split in splits(rows):
        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in split) or "split"
        if any(p.stem == f"interpolation_{stem}" for p in paths):
            stem += f"_{len(paths)}"
        paths.append(plot_interpolation(rows, split, Path(out_dir) / f"interpolation_{stem}.svg", colors))
    return paths
