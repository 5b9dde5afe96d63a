"""The report section of a many-model merge (:mod:`mergescope.studies.merge`): a figure and a table per split."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..runs.atomic import atomic_write_text
from ..timing import staged
from .figures import method_colors
from .html import FIGURES_DIR, _environment
from .svg_plot import Bars, Figure, Line, Panel, Rule


@staged("rendering")
def plot_many(result: Mapping, split: str, path: str | os.PathLike) -> Path:
    """Horizontal bars: each method's accuracy (and its gap to the mean input model, in points) beside every input
    model's accuracy (triangles) and their mean (dashed line) (SVG)."""
    rows = [r for r in result["rows"] if r["split"] == split]
    ends = [e["accuracy"] * 100 for e in result["endpoints"] if e["split"] == split]
    mean = result["summary"][split]["mean_endpoint_accuracy"] * 100
    colors = method_colors([r["method"] for r in rows])
    accs = [r["accuracy"] * 100 for r in rows]
    notes = [(f"{acc:.1f}%  ({acc - mean:+.1f})", acc > 35) for acc in accs]
    items = [Bars(accs, [colors[r["method"]] for r in rows], notes),
             Rule(mean, "#000", 1.5, (4, 2), label=f"mean of the {len(ends)} models: {mean:.1f}%"),
             Line(ends, [-0.8] * len(ends), "#000", marker="v", size=9, stroke=False, label="each model",
                  tips=[f"{e['model']}: {e['accuracy'] * 100:.1f}%" for e in result["endpoints"]
                        if e["split"] == split])]
    panel = Panel(items, f"{len(ends)} models merged into one",
                  f"{split} accuracy (%); in brackets: points vs the mean model", xlim=(0, 102),
                  ylim=(-1.3, len(rows) - 0.4), categories=[r["method"] for r in rows], grid="x")
    return atomic_write_text(path, Figure([panel], 760, 30 * len(rows) + 130, legend="bottom").svg())


def many_section(run_dir: str | os.PathLike, result: Mapping, csv_name: str) -> tuple[dict, list[Path]]:
    """Draw the figures; return the report section ``{"title", "html"}`` of a many-model merge and the figures."""
    run_dir = Path(run_dir)
    n = len({e["model"] for e in result["endpoints"]})
    figures = []
    for split in result["summary"]:
        path = plot_many(result, split, run_dir / FIGURES_DIR / f"merge_{n}_models_{split}.svg")
        figures.append({"src": path.relative_to(run_dir).as_posix(), "split": split})
    best = {split: max(s["gap"], key=s["gap"].get) for split, s in result["summary"].items()}
    html = _environment().get_template("_many_section.html").render(
        result=result, figures=figures, csv_href=csv_name, n=n, best=best)
    return {"title": f"Merging {n} models", "html": html}, [run_dir / f["src"] for f in figures]
