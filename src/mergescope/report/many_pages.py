"""The report section of a many-model merge (:mod:`mergescope.studies.merge`): a figure and a table per split."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..timing import staged
from .compare_figures import _save
from .figures import DPI, _plain, method_colors
from .html import FIGURES_DIR, _environment


@staged("rendering")
def plot_many(result: Mapping, split: str, path: str | os.PathLike) -> Path:
    """Horizontal bars: each method's accuracy (and its gap to the mean input model, in points) beside every input
    model's accuracy (triangles) and their mean (dashed line)."""
    rows = [r for r in result["rows"] if r["split"] == split]
    ends = [e["accuracy"] * 100 for e in result["endpoints"] if e["split"] == split]
    mean = result["summary"][split]["mean_endpoint_accuracy"] * 100
    colors = method_colors([r["method"] for r in rows])
    fig = Figure(figsize=(8, 0.42 * len(rows) + 1.9), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ys = list(range(len(rows)))[::-1]
    accs = [r["accuracy"] * 100 for r in rows]
    ax.barh(ys, accs, color=[colors[r["method"]] for r in rows], height=0.7)
    for y, acc in zip(ys, accs):
        label = f"{acc:.1f}%  ({acc - mean:+.1f})"
        inside = acc > 35
        ax.text(acc - 1 if inside else acc + 1, y, label, va="center", ha="right" if inside else "left",
                fontsize=8, color="white" if inside else "black")
    ax.axvline(mean, color="black", ls="--", lw=1.2, label=f"mean of the {len(ends)} models: {mean:.1f}%")
    ax.scatter(ends, [len(rows) - 0.2] * len(ends), marker="v", color="black", s=25, zorder=5,
               label="each model")
    ax.set_yticks(ys, [_plain(r["method"]) for r in rows])
    ax.set_xlim(0, 102)
    ax.set_ylim(-0.6, len(rows) + 0.2)
    ax.set_xlabel(f"{_plain(split)} accuracy (%); in brackets: points vs the mean model")
    ax.grid(True, axis="x", alpha=0.35)
    fig.legend(fontsize=8, frameon=False, loc="outside lower center", ncols=2)
    ax.set_title(f"{len(ends)} models merged into one", fontsize=11)
    return _save(fig, path)


def many_section(run_dir: str | os.PathLike, result: Mapping, csv_name: str) -> tuple[dict, list[Path]]:
    """Draw the figures; return the report section ``{"title", "html"}`` of a many-model merge and the figures."""
    run_dir = Path(run_dir)
    n = len({e["model"] for e in result["endpoints"]})
    figures = []
    for split in result["summary"]:
        path = plot_many(result, split, run_dir / FIGURES_DIR / f"merge_{n}_models_{split}.png")
        figures.append({"src": path.relative_to(run_dir).as_posix(), "split": split})
    best = {split: max(s["gap"], key=s["gap"].get) for split, s in result["summary"].items()}
    html = _environment().get_template("_many_section.html").render(
        result=result, figures=figures, csv_href=csv_name, n=n, best=best)
    return {"title": f"Merging {n} models", "html": html}, [run_dir / f["src"] for f in figures]
