"""Report pages of the regression alignment (issue 5, item 4): held-out R² and recovered top-k against m per layer, and
the image grids of the channels that need many weights (A, B's best single channel, regressed B at m = 1, 5 %,
all)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..align.regressed_topk import GroupTopK, pick
from ..align.regression import keep_count
from ..timing import staged
from .compare_figures import _save
from .features import FeatureView, render_feature_pages, view_from_record, view_record
from .figures import DPI
from .html import _environment

SLUG = "regress"
FIGURE = "figures/regression.png"
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


@staged("rendering")
def plot_regression(summary: Sequence[Mapping], path) -> Path:
    """Two panels (mean R², mean recovered top-k) against m / C_B (log), one colour per layer (every observation
    point of a residual stream is a layer of its own); solid = refit, dashed = the kept weights as they are."""
    layers = list(dict.fromkeys(r["layer"] for r in summary))
    colors = _COLORS if len(layers) <= len(_COLORS) else [matplotlib.colormaps["viridis"](i / (len(layers) - 1))
                                                           for i in range(len(layers))]
    fig = Figure(figsize=(9 + 1.6 * (1 + len(layers) // 16), 3.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for li, layer in enumerate(layers):
        rows = [r for r in summary if r["layer"] == layer and r["refit"] is not None]
        cb = max(r["m"] for r in rows)
        for refit, style in ((True, "-"), (False, "--")):
            sel = sorted((r for r in rows if r["refit"] == refit or r["m"] == cb), key=lambda r: r["m"])
            x = [r["m"] / cb for r in sel]
            for ax, key in zip(axes, ("mean_r2", "mean_recovered")):
                y = [np.nan if r[key] is None else r[key] for r in sel]
                ax.plot(x, y, style, marker="o", ms=3, color=colors[li % len(colors)],
                        label=layer if refit and ax is axes[0] else None)
    for ax, title in zip(axes, ("mean R² (held-out images)", "mean recovered top-k of A")):
        ax.set_xscale("log")
        ax.set_xlabel("weights kept per channel, m / C_B")
        ax.set_title(title + " — solid: refit, dashed: as kept", fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=7, ncol=1 + len(layers) // 16)
    return _save(fig, path)


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
