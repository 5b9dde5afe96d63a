"""Pages of the channel comparison: metric values on the feature pages, a sortable channel table per layer,
histograms, the Observation 2/3 tables, the partial-merge curves — rendered from a :class:`CompareResult`.

Nothing here computes a metric; everything is read from the comparison's rows and summaries.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from markupsafe import Markup

from mergescope.runs.atomic import atomic_write_text
from mergescope.timing import staged
from mergescope.report.compare_figures import plot_metric_histograms, plot_partial_merge
from mergescope.report.feature_data import script_json
from mergescope.report.features import channel_href
from mergescope.report.html import FIGURES_DIR, _environment

FEATURES_DIR = "features"
_INFO_PREFIXES = ("τ ", "CLIP-δ ", "fallback-δ ", "overlap ")  # channel_info keys this module adds


def delta_label(kind: str | None) -> str:
    """How the δ column is called: "CLIP-δ" only when CLIP embedded the images, "fallback-δ" otherwise."""
    return "CLIP-δ" if kind == "clip" else "fallback-δ"


def embedding_label(kind: str | None) -> str:
    """How an embedding-similarity category is called: "CLIP embedding" only for CLIP, "fallback embedding"
    otherwise (like :func:`delta_label`)."""
    return "CLIP embedding" if kind == "clip" else "fallback embedding"


def model_label(name: str) -> str:
    """A probe model name as people say it: ``"B_aligned"`` -> ``"B"``."""
    return name.removesuffix("_aligned")


def _safe(layer: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in layer)


def table_name(layer: str) -> str:
    """File name of a layer's channel table under ``features/``."""
    return f"table_{_safe(layer)}.html"


def _pairs(result) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r["reference"], r["model"]) for r in result.rows))


def _layers(result) -> list[str]:
    return list(dict.fromkeys(r["layer"] for r in result.rows))


def _kind(result) -> str | None:
    return (result.embedder or {}).get("kind")


def annotate_recipes(recipes: Sequence[Mapping], result) -> list[dict]:
    """Feature-view recipes with τ, δ and overlap added to ``channel_info`` for every compared pair whose two
    models are rows of the view (None where a value is undefined or the channel dead: shown as a dash).

    Keys added by an earlier call are replaced, so annotating twice (or with another embedder) is clean.
    """
    dl = delta_label(_kind(result))
    out = []
    for recipe in recipes:
        shown = set(recipe.get("rows", {}).values())
        info = {layer: {k: v for k, v in d.items() if not k.startswith(_INFO_PREFIXES)}
                for layer, d in recipe.get("channel_info", {}).items()}
        for reference, model in _pairs(result):
            if reference not in shown or model not in shown:
                continue
            label = model_label(model)
            for layer in _layers(result):
                rows = [r for r in result.rows if (r["reference"], r["model"], r["layer"]) == (reference, model, layer)]
                if not rows:
                    continue
                d = info.setdefault(layer, {})
                for metric, name in (("kendall_tau", "τ"), ("clip_delta", dl), ("overlap", "overlap")):
                    v, ok = result.values(reference, model, layer, metric)
                    if metric == "clip_delta" and result.embedder is None:
                        continue
                    d[f"{name} {label}"] = [float(x) if good else None for x, good in zip(v, ok)]
        out.append({**recipe, "channel_info": info})
    return out


@staged("rendering")
def render_channel_tables(run_dir: str | os.PathLike, result, views: Sequence[str] = ("pair", "many")) -> list[dict]:
    """Write ``features/table_<layer>.html``: every channel of a layer with every metric, sortable by any
    column, each channel linked to its feature views (``<view>_<layer>.html#c<channel>``).

    The rows are data in the page (per channel: id, dead, then per column a number — 6 significant digits —, a
    one-element list for a value not trusted, null, or the number of a category's text in ``texts``) that its
    script turns into the table,
    so a 4,096-channel layer is not megabytes of markup.

    Args:
        views: slugs of the feature views to link (those whose pages exist under ``features/``).

    Returns:
        One entry per layer: {"layer", "channels", "href"} (href relative to ``run_dir``).
    """
    run_dir = Path(run_dir)
    env = _environment()
    template = env.get_template("channel_table.html")
    dl = delta_label(_kind(result))
    pairs = _pairs(result)
    index = []
    for layer in _layers(result):
        by_pair = {p: [r for r in result.rows if (r["reference"], r["model"], r["layer"]) == (*p, layer)]
                   for p in pairs}
        by_pair = {p: rs for p, rs in by_pair.items() if rs}
        channels = len(next(iter(by_pair.values())))
        links = [v for v in views if (run_dir / FEATURES_DIR / channel_href(v, layer, 0).split("#")[0]).exists()]
        columns = []
        for (reference, model), rs in by_pair.items():
            lab = model_label(model)
            columns += [(f"{name} {lab}{_threshold_note(rs[0], metric)}", metric, rs) for metric, name in
                        (("kendall_tau", "τ"), ("clip_delta", dl), ("overlap", "overlap"), ("correlation", "corr"))]
            for col, name in _CATEGORY_COLUMNS:  # Observation 2 only where a merged model was compared
                if any(r.get(col) for r in rs):
                    columns.append((f"{name.format(emb=embedding_label(_kind(result)))} {lab}", col, rs))
        columns = [c for c in columns if not (c[1] == "clip_delta" and result.embedder is None)]
        consensus = next(iter(by_pair.values()))[0]["consensus"] != ""
        table, texts = [], {}  # texts: category text -> its number in the data
        for j in range(channels):
            cells: list = []
            for _, metric, rs in columns:
                r = rs[j]
                if metric in _TEXT:
                    cells.append(texts.setdefault(r.get(metric) or "", len(texts)))
                    continue
                v, ok = r[metric], _usable(r, metric)
                cells.append(None if v is None else float(f"{v:.6g}") if ok else [float(f"{v:.6g}")])
            if consensus:
                for col in ("consensus", "consensus_fixed_threshold"):
                    text = by_pair[pairs[0]][j].get(col) or "" if pairs[0] in by_pair else ""
                    cells.append(texts.setdefault(text, len(texts)))
            table.append([j, int(any(rs[j]["dead"] for rs in by_pair.values())), *cells])
        headers = [{"name": name, "num": metric not in _TEXT} for name, metric, _ in columns]
        if consensus:
            headers += [{"name": "consensus (null)", "num": False},
                        {"name": "consensus, fixed threshold", "num": False}]
        data = {"rows": table, "texts": list(texts),
                "links": [{"slug": v, "page": channel_href(v, layer, 0).split("#")[0]} for v in links]}
        html = template.render(title=f"Channel table — {layer}", layer=layer, headers=headers,
                               data=Markup(script_json(data)),
                               delta_label=dl, embedder=result.embedder, subset_size=result.subset_size,
                               quantile_text=_quantile_text(result.rules.get("similar", {}).get("quantile")))
        atomic_write_text(run_dir / FEATURES_DIR / table_name(layer), html)
        index.append({"layer": layer, "channels": channels, "href": f"{FEATURES_DIR}/{table_name(layer)}"})
    return index


_CATEGORY_COLUMNS = (("category", "category (null)"), ("category_id_overlap", "category by id overlap"),
                     ("category_embedding", "category by {emb}"))
_TEXT = tuple(c for c, _ in _CATEGORY_COLUMNS)


def _threshold_note(row: Mapping, metric: str) -> str:
    """" (similar > 0.123)": the layer's null threshold for the metric, as a column header states it."""
    t = row.get(f"null_threshold_{metric}")
    if t is None:
        return ""
    side = "<" if metric == "clip_delta" else ">"
    return f" (similar {side} {t:.3g})"


def _quantile_text(q: float | None) -> str:
    if q is None:
        return "null quantile"
    return f"{100 * q:g}th percentile (for δ, lower = similar: its {100 * (1 - q):g}th percentile)"


def _usable(row: Mapping, metric: str) -> bool:
    if row[metric] is None or row["dead"]:
        return False
    flag = {"kendall_tau": "kendall_defined", "clip_delta": "clip_delta_defined"}.get(metric)
    return bool(row[flag]) if flag else True


@staged("rendering")
def render_histograms(run_dir: str | os.PathLike, result) -> list[dict]:
    """``figures/compare_<layer>.svg`` per layer: histograms of every metric, one line per pair.

    Returns:
        [{"layer", "src"}] with src relative to ``run_dir``.
    """
    run_dir = Path(run_dir)
    dl = delta_label(_kind(result))
    titles = {"kendall_tau": f"Kendall τ on D′ ({result.subset_size} images)", "clip_delta": f"{dl} of the top-k",
              "overlap": "top-k overlap", "correlation": "matching correlation"}
    out = []
    for layer in _layers(result):
        values: dict[str, dict[str, np.ndarray]] = {}
        for reference, model in _pairs(result):
            if not any(r["layer"] == layer and r["model"] == model for r in result.rows):
                continue
            for metric in titles:
                if metric == "clip_delta" and result.embedder is None:
                    continue
                v, ok = result.values(reference, model, layer, metric)
                values.setdefault(metric, {})[model_label(model)] = v[ok]
        path = run_dir / FIGURES_DIR / f"compare_{_safe(layer)}.svg"
        plot_metric_histograms(values, titles, path, suptitle=f"layer {layer}: usable channels (defined, not dead)")
        out.append({"layer": layer, "src": path.relative_to(run_dir).as_posix()})
    return out


@staged("rendering")
def render_partial_merge(run_dir: str | os.PathLike, rows: Sequence[Mapping], result, title: str = "") -> dict:
    """``figures/partial_merge.svg`` and a summary table of the curves (accuracy at each fraction)."""
    run_dir = Path(run_dir)
    names = {"kendall_tau": "τ", "clip_delta": delta_label(_kind(result)), "overlap": "overlap",
             "correlation": "correlation"}
    path = plot_partial_merge(rows, run_dir / FIGURES_DIR / "partial_merge.svg", names, title)
    fractions = sorted({r["fraction"] for r in rows})
    curves = []
    for metric in dict.fromkeys(r["metric"] for r in rows if r["metric"] != "random"):
        for direction in ("top", "bottom"):
            acc = {r["fraction"]: r["accuracy"] for r in rows if r["metric"] == metric and r["direction"] == direction}
            if acc:
                curves.append({"name": f"{names.get(metric, metric)}, "
                                       f"{'most' if direction == 'top' else 'least'} similar first",
                               "acc": [acc.get(f) for f in fractions]})
    random = [r for r in rows if r["metric"] == "random"]
    if random:
        seeds = sorted({r["seed"] for r in random})
        curves.append({"name": f"random channels (mean of {len(seeds)} seeds)",
                       "acc": [float(np.mean([r["accuracy"] for r in random if r["fraction"] == f]))
                               if any(r["fraction"] == f for r in random) else None for f in fractions]})
    return {"src": path.relative_to(run_dir).as_posix(), "fractions": fractions, "curves": curves}


def compare_section_html(result, tables: Sequence[Mapping], histograms: Sequence[Mapping],
                         partial: Mapping | None = None, csv_href: str = "compare.csv",
                         notes: Sequence[str] = ()) -> str:
    """The "Channel comparison" section of the run's report (an HTML fragment; links relative to the run)."""
    dl = delta_label(_kind(result))
    o3 = result.rules["observation3"]
    metric_names = {"kendall_tau": "Kendall τ", "clip_delta": dl, "overlap": "top-k overlap",
                    "correlation": "matching correlation"}
    o1_metrics = [(m, name) for m, name in metric_names.items()
                  if any((s.get(f"null_{m}") or {}).get("threshold") is not None for s in result.layers)]
    return _environment().get_template("_compare_section.html").render(
        result=result, tables=tables, histograms=histograms, partial=partial, csv_href=csv_href,
        delta_label=dl, embedding_label=embedding_label(_kind(result)), labels={m: model_label(m) for _, m in _pairs(result)},
        o3_metric=metric_names[o3["metric"]], o3=o3, o3f=result.rules["observation3_fixed_threshold"],
        sim=result.rules["similar"], o1_metrics=o1_metrics, thesis=result.thesis, notes=list(notes),
        table_href={t["layer"]: t["href"] for t in tables})


__all__ = ["annotate_recipes", "compare_section_html", "delta_label", "embedding_label", "model_label", "render_channel_tables",
           "render_histograms", "render_partial_merge", "table_name"]
