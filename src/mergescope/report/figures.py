"""Interpolation-curve figures (PNG, rendered with the Agg backend, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mergescope.runs.atomic import atomic_path
from mergescope.timing import staged
from mergescope.report.interpolation import curves, methods, splits

ALPHA_LABEL = "α (0 = model B, 1 = model A)"
DPI = 110
_KNOWN_COLORS = {
    "naive": "#7f7f7f",
    "permuted": "#1f77b4",
    "permuted+repair": "#2ca02c",
    "permuted+reset": "#ff7f0e",
}
_SPARE_COLORS = ("#9467bd", "#d62728", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_LOG_LOSS_RATIO = 30.0
# the i-th method of a figure: its dash pattern and marker (cycled), and a line and marker each a little thinner
# and smaller than the one before, which is drawn below it, so that methods with the same curve (e.g. REPAIR and
# RESET on a BatchNorm net) all stay visible
_DASHES = ("-", (0, (5, 2)), (0, (1, 1.2)), (0, (6, 2, 1, 2)), (0, (9, 3)), (0, (3, 1, 1, 1, 1, 1)))
_MARKERS = ("o", "s", "^", "D", "v", "P")


def method_colors(names: Sequence[str]) -> dict[str, str]:
    """A fixed hex colour per method: the usual methods always get the same one, others share a spare cycle."""
    colors = {n: _KNOWN_COLORS[n.lower()] for n in names if n.lower() in _KNOWN_COLORS}
    others = [n for n in names if n not in colors]
    for i, name in enumerate(others):
        colors[name] = _SPARE_COLORS[i % len(_SPARE_COLORS)]
    return colors


def _plain(text: str) -> str:
    """``text`` with ``$`` escaped, so matplotlib never reads a user's name as mathtext."""
    return text.replace("$", r"\$")


def _style(i: int) -> dict:
    """Line keywords of the i-th method of a figure (:data:`_DASHES`, :data:`_MARKERS`)."""
    return {"ls": _DASHES[i % len(_DASHES)], "lw": max(1.0, 3.0 - 0.35 * i), "marker": _MARKERS[i % len(_MARKERS)],
            "ms": max(2.5, 6.5 - 0.8 * i)}


def _draw_panel(ax, split_curves: Mapping[str, list[dict]], key: str, scale: float, colors: Mapping[str, str]) -> None:
    ax.axvline(0.5, color="#bbbbbb", lw=0.8, ls=":", zorder=0)
    for i, (method, curve) in enumerate(split_curves.items()):
        alphas = [r["alpha"] for r in curve]
        values = [r[key] * scale for r in curve]
        ax.plot(alphas, values, color=colors[method], zorder=2 + i, **_style(i))
        ends = [(a, v) for a, v in zip(alphas, values) if min(abs(a), abs(a - 1)) <= 1e-6]
        ax.scatter([a for a, _ in ends], [v for _, v in ends], s=70, color=colors[method],
                   edgecolors="black", linewidths=1.0, zorder=20)
    ax.set_xlim(-0.03, 1.03)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
    ax.set_xlabel(ALPHA_LABEL)
    ax.grid(True, alpha=0.35)


def plot_interpolation(rows: Iterable[Mapping], split: str, path: str | os.PathLike,
                       colors: Mapping[str, str] | None = None) -> Path:
    """Save a two-panel figure (accuracy vs α, loss vs α; one line per method) for ``split``; return ``path``.

    Each method has its own dash pattern and marker, each drawn thinner than the one before and above it, so that
    methods with the same curve all stay visible. Endpoints (α = 0 and α = 1) are drawn as large outlined markers.
    The loss axis switches to a log
    scale when the losses span more than a factor of 30.
    """
    rows = list(rows)
    colors = dict(colors) if colors is not None else method_colors(methods(rows))
    split_curves = {m: c for (m, s), c in curves(rows).items() if s == split}
    fig = Figure(figsize=(11, 4.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    acc_ax, loss_ax = fig.subplots(1, 2)

    _draw_panel(acc_ax, split_curves, "accuracy", 100.0, colors)
    acc_ax.set_title("Accuracy")
    acc_ax.set_ylabel(f"{_plain(split)} accuracy (%)")

    _draw_panel(loss_ax, split_curves, "loss", 1.0, colors)
    losses = [r["loss"] for c in split_curves.values() for r in c if r["loss"] == r["loss"]]
    log = bool(losses) and min(losses) > 0 and max(losses) / min(losses) > _LOG_LOSS_RATIO
    if log:
        loss_ax.set_yscale("log")
    loss_ax.set_title("Loss" + (" (log scale)" if log else ""))
    loss_ax.set_ylabel(f"{_plain(split)} loss")

    handles = [Line2D([], [], color=colors[m], label=_plain(m), **_style(i)) for i, m in enumerate(split_curves)]
    handles.append(Line2D([], [], ls="", marker="o", ms=8, mfc="white", mec="black", label="endpoints (B, A)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), frameon=False)
    fig.suptitle(rf"Interpolation $\theta(\alpha) = \alpha\,\theta_A + (1-\alpha)\,P(\theta_B)$ — {_plain(split)} split",
                 fontsize=13)

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(path)


@staged("rendering")
def interpolation_figures(rows: Iterable[Mapping], out_dir: str | os.PathLike,
                          colors: Mapping[str, str] | None = None) -> list[Path]:
    """One ``interpolation_<split>.png`` per split in ``out_dir`` (test first, then train, then others)."""
    rows = list(rows)
    colors = dict(colors) if colors is not None else method_colors(methods(rows))
    paths: list[Path] = []
    for split in splits(rows):
        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in split) or "split"
        if any(p.stem == f"interpolation_{stem}" for p in paths):
            stem += f"_{len(paths)}"
        paths.append(plot_interpolation(rows, split, Path(out_dir) / f"interpolation_{stem}.png", colors))
    return paths
