"""Report pages of the regression alignment (issue 5, item 4): held-out R² and recovered top-k against m per layer, and
the image grids of the channels that need many weights (A, B's best single channel, regressed B at m = 1, 5 %,
all)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..align.regressed_topk import GroupTopK, pick
from ..align.regression import keep_count
from ..runs.atomic import atomic_write_text
from ..timing import staged
from .features import FeatureView, render_feature_pages, view_from_record, view_record
from .html import _environment
from .svg_plot import Figure, Line, Panel

SLUG = "regress"
FIGURE = "figures/regression.svg"
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def layer_colors(n: int) -> list[str]:
    """``n`` distinct colours: :data:`_COLORS` while they last, else ``n`` hues evenly round the colour wheel."""
    return list(_COLORS[:n]) if n <= len(_COLORS) else [f"hsl({360 * i / n:.0f}, 70%, 42%)" for i in range(n)]


@staged("rendering")
def plot_regression(summary: Sequence[Mapping], path) -> Path:
    """Two panels (mean R², mean recovered top-k) against m / C_B (log), one colour per layer (every observation
    point of a residual stream is a layer of its own); solid = refit, dashed = the kept weights as they are (SVG)."""
    layers = list(dict.fromkeys(r["layer"] for r in summary))
    colors = layer_colors(len(layers))
    items: dict[str, list] = {"mean_r2": [], "mean_recovered": []}
    for li, layer in enumerate(layers):
        rows = [r for r in summary if r["layer"] == layer and r["refit"] is not None]
        cb = max(r["m"] for r in rows)
        for refit in (True, False):
            sel = sorted((r for r in rows if r["refit"] == refit or r["m"] == cb), key=lambda r: r["m"])
            x = [r["m"] / cb for r in sel]
            for key, what in (("mean_r2", "mean R²"), ("mean_recovered", "mean recovered top-k")):
                y = [math.nan if r[key] is None else r[key] for r in sel]
                tips = [f"{layer}, m = {r['m']} of {cb} ({'refit' if refit else 'as kept'}): {what} {v:.3f}"
                        for r, v in zip(sel, y)]
                items[key].append(Line(x, y, colors[li], width=2.0, dash=() if refit else (4, 2), marker="o",
                                       size=5, label=layer if refit else "", tips=tips))
    panels = [Panel(items[key], title, "weights kept per channel, m / C_B", xlog=True, ylim=(-0.05, 1.05))
              for key, title in (("mean_r2", "mean R² (held-out images)"),
                                 ("mean_recovered", "mean recovered top-k of A"))]
    figure = Figure(panels, 470, 330, "solid: refit on the kept weights · dashed: the kept weights as they are",
                    legend="right")
    return atomic_write_text(path, figure.svg())


def regression_views(tops: Mapping[str, GroupTopK], hard: Mapping[str, Sequence[dict]],
                     fraction: float = 0.05) -> list[FeatureView]:
    """One view per layer showing only its hard channels (largest R² gap first)."""
    views = []
    for gt in tops.values():
        chans = [h["channel"] for h in hard.get(gt.layer, [])]
        if not chans:
            continue
        m = keep_count(fraction, gt.channels_b)
        maps = {"regressed B (m=1)": pick(gt, 1), f"regressed B ({fraction * 100:g}%, m={m})": pick(gt, m),
                "regressed B (all)": pick(gt, gt.channels_b)}
        rows = {"A": gt.a_ids, "B best single channel": gt.single_ids,
                **{label: mp.ids for label, mp in maps.items() if mp is not None}}
        values = {"A": gt.a_values, "B best single channel": gt.single_values,
                  **{label: mp.values for label, mp in maps.items() if mp is not None}}
        full, sparse = maps["regressed B (all)"], maps[f"regressed B ({fraction * 100:g}%, m={m})"]
        info = {"B channel": [float(j) for j in gt.single],
                "R² all (held-out)": [None if np.isnan(v) else float(v) for v in full.r2],
                f"R² {fraction * 100:g}% refit (held-out)": [None if np.isnan(v) else float(v) for v in sparse.r2],
                "recovered all": [None if np.isnan(v) else float(v) for v in full.recovered],
                f"recovered {fraction * 100:g}%": [None if np.isnan(v) else float(v) for v in sparse.recovered]}
        views.append(FeatureView(SLUG, "Channels that need many weights", gt.layer, rows, values, info,
                                 note="Rows: A's top images; B's channel with the largest |weight| as it is; the "
                                      "regressed B channel (spatial max of the linear combination of B's maps at this "
                                      "layer) with 1 weight, the sparse refit, and all weights.", order=chans))
    return views


def regression_section_html(summary: Sequence[Mapping], hard: Mapping[str, Sequence[dict]], pages: Sequence[dict],
                            figure: str, csv_href: str, info: Mapping) -> str:
    """The "Regression alignment" section of the report."""
    href = {p["layer"]: p["href"] for p in pages}
    return _environment().get_template("_regression_section.html").render(
        summary=summary, hard=hard, href=href, figure=figure, csv_href=csv_href, info=info)


def regression_records(tops: Mapping[str, GroupTopK], hard: Mapping[str, Sequence[dict]],
                       fraction: float = 0.05) -> list[dict]:
    """The hard channels' views as JSON records (:func:`view_record`): what the pages are rendered from."""
    return [view_record(v) for v in regression_views(tops, hard, fraction)]


@staged("rendering")
def render_regression_pages(run_dir, dataset, records: Sequence[Mapping]) -> list[dict]:
    """Write the hard channels' feature pages (slug "regress") from their records; returns their index."""
    return render_feature_pages(run_dir, dataset, [view_from_record(r) for r in records])
