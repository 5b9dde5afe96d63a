"""The overview of a study (``STUDY/report.html``): per question of the thesis (000 §3.2, Figs 3.1–3.5,
Appendices A–C) the number this study measured and how it was judged, with example channels chosen by the metric.

The questions: the loss barrier along α (Fig. 3.1); partial merging by metric against random channels (Fig. 3.2);
Observation 1 (the share of matched channels judged similar), Observation 2 (where the merged model's top images
come from), Observation 3 (all / most / none of the models similar, beside the thesis's 5–10% / 35–50% / 40–60%),
Observation 4 (recovered top-k of A against the regression's sparsity m, Fig. 3.5); and the N-model merge.
Everything is read from the parts' ``results.json`` (and ``compare.csv``); :func:`overview_context` computes,
:func:`render_overview` writes the overview, one page per layer and one per channel.

A study folder holds up to three run folders (any may be absent):

- ``sweep/``: ``mergescope sweep`` of A and B;
- ``features/``: ``mergescope probe`` of A, B, C… (``--alpha``), with ``compare --partial-merge`` and ``regress``;
- ``merge/``: ``mergescope merge`` of all models.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import MergescopeError
from ..runs.atomic import atomic_write_text
from ..timing import staged
from .channel_images import ChannelImages
from .channel_pages import ChannelTables, TileSheets, channel_page, render_channel_pages
from .compare_pages import model_label, table_name
from .features import TILE
from .headline import against_models, best_midpoint, direct_average, lowest_barrier
from .html import REPORT_NAME, _environment
from .interpolation import barriers, splits
from .layer_pages import layer_page, render_layer_pages

PARTS = ("sweep", "features", "merge")
O2_CATEGORIES = ("A", "B", "mixed", "neither", "undefined")
O3_CATEGORIES = ("all similar", "most similar", "few similar", "all dissimilar")
THESIS_O3_KEYS = ("all similar", "most similar", "all dissimilar")


class Overview(NamedTuple):
    """What :func:`render_overview` wrote: the overview page and every file (for the manifest's hashes)."""

    path: Path
    files: list[Path]


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _load(part: Path) -> dict:
    path = part / "results.json"
    if not path.is_file():
        raise MergescopeError(f"{part} holds no results.json: not a finished run folder")
    return json.loads(path.read_text(encoding="utf-8"))


# -- the numbers ------------------------------------------------------------------------------------------------

def interpolation_answer(results: Mapping, prefix: str) -> dict:
    """Q1 (Fig. 3.1): barrier and midpoint of every method on every split (:func:`barriers`, endpoints = A and B);
    on the first split the answer ``best``, the merge with the smallest accuracy barrier (:func:`lowest_barrier`),
    ``best_midpoint``, the merge with the best accuracy at α = 0.5 (:func:`best_midpoint`; may be another one,
    e.g. a map-based merge whose α = 0 end falls far below model B), ``baseline``, the direct average, and
    ``against_models``, whether the barriers' line runs from model B to model A (else each method's own ends);
    ``prefix``: the sweep folder, relative to the page."""
    rows = results.get("rows") or []
    if not rows:
        raise MergescopeError("the sweep's results.json has no interpolation rows")
    stats = barriers(rows, results.get("endpoints"), results.get("corrections"))
    split = splits(rows)[0]
    alphas = sorted({float(r["alpha"]) for r in rows})
    return {"split": split, "barriers": stats, "best": lowest_barrier(stats, split),
            "best_midpoint": best_midpoint(stats, split), "baseline": direct_average(stats, split),
            "against_models": against_models(results.get("endpoints"), split), "alphas": len(alphas),
            "step": alphas[1] - alphas[0] if len(alphas) > 1 else None,
            "endpoints": list(results.get("endpoints") or []), "matching": results.get("matching_method", ""),
            "report": f"{prefix}/{REPORT_NAME}", "csv": f"{prefix}/interpolation.csv"}


def partial_merge_answer(rows: Sequence[Mapping], names: Mapping[str, str]) -> dict | None:
    """Q2 (Fig. 3.2): each metric's curve (most / least similar channels merged first) against the random-channel
    baseline: its mean over seeds, standard deviation (ddof = 1) and min–max at every fraction; per curve the mean
    gap to the random mean over the interior fractions (0 < f < 1) and at how many of them the curve leaves the
    random min–max band."""
    if not rows:
        return None
    fractions = sorted({float(r["fraction"]) for r in rows})
    random = [r for r in rows if r["metric"] == "random"]
    seeds = sorted({r["seed"] for r in random})
    band = {}
    for f in fractions:
        acc = np.array([r["accuracy"] for r in random if float(r["fraction"]) == f], dtype=np.float64)
        band[f] = {"mean": float(acc.mean()), "sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                   "min": float(acc.min()), "max": float(acc.max())} if len(acc) else None
    interior = [f for f in fractions if 0 < f < 1 and band[f] is not None]
    curves = []
    for metric in dict.fromkeys(r["metric"] for r in rows if r["metric"] != "random"):
        for direction in ("top", "bottom"):
            acc = {float(r["fraction"]): r["accuracy"] for r in rows
                   if r["metric"] == metric and r["direction"] == direction}
            if not acc:
                continue
            gaps = [acc[f] - band[f]["mean"] for f in interior if f in acc]
            outside = sum(1 for f in interior if f in acc and not band[f]["min"] <= acc[f] <= band[f]["max"])
            curves.append({"metric": metric, "direction": direction, "name": names.get(metric, metric),
                           "order": "most similar first" if direction == "top" else "least similar first",
                           "acc": [acc.get(f) for f in fractions],
                           "mean_gap": float(np.mean(gaps)) if gaps else None, "outside": outside,
                           "interior": len([f for f in interior if f in acc])})
    ranked = [c for c in curves if c["mean_gap"] is not None]
    return {"fractions": fractions, "band": [band[f] for f in fractions], "seeds": len(seeds), "curves": curves,
            "largest": max(ranked, key=lambda c: abs(c["mean_gap"]), default=None),
            "outside_total": sum(c["outside"] for c in curves), "interior_total": sum(c["interior"] for c in curves)}


def _pooled(rows: Sequence[Mapping], count: str, total: str) -> float | None:
    n = sum(r.get(total) or 0 for r in rows)
    return sum(r.get(count) or 0 for r in rows) / n if n else None


def observation1(compare: Mapping, names: Mapping[str, str]) -> dict:
    """Observation 1: per compared model and layer, the share of channels judged similar under each metric against
    its null (threshold and null size beside it); pooled over layers (similar channels / channels)."""
    metrics = [m for m in names if any((s.get(f"null_{m}") or {}).get("threshold") is not None
                                       for s in compare["layers"])]
    models = list(dict.fromkeys(s["model"] for s in compare["layers"]))
    pooled = {m: {metric: _pooled([s for s in compare["layers"] if s["model"] == m and
                                   s.get(f"n_similar_{metric}") is not None], f"n_similar_{metric}", "channels")
                  for metric in metrics} for m in models}
    return {"metrics": metrics, "layers": compare["layers"], "models": models, "pooled": pooled}


def observation2(compare: Mapping) -> dict | None:
    """Observation 2: per layer, the shares of the unmatched channels whose merged top images are judged A's only,
    B's only, both (mixed), neither or undefined (the null rule of ``consensus_metric``); pooled over layers."""
    rows = [r for r in compare.get("observation2") or [] if r.get("nulls")]
    if not rows:
        return None
    pooled = {c: _pooled(rows, f"n_{c}", "unmatched") for c in O2_CATEGORIES}
    matched = _pooled(rows, "matched", "channels")
    return {"rows": rows, "pooled": pooled, "matched": matched, "merged": rows[0]["merged_model"]}


def thesis_ranges(thesis: Mapping) -> dict[str, tuple[float, float]]:
    """The thesis's Observation 3 ranges as fractions, read off their text ("5–10%" -> (0.05, 0.10))."""
    out = {}
    for key in THESIS_O3_KEYS:
        bounds = [float(x) / 100 for x in re.findall(r"\d+(?:\.\d+)?", str(thesis.get(key, "")))]
        if len(bounds) == 2:
            out[key] = (bounds[0], bounds[1])
    return out


def observation3(compare: Mapping) -> dict | None:
    """Observation 3: per layer and pooled over layers, the shares of A's channels that all / most / few / none of
    the aligned models match (null rule), beside the thesis's ranges and whether each pooled share lies in them."""
    rows = compare.get("observation3") or []
    rows = [r for r in rows if f"n_{O3_CATEGORIES[0]}" in r]
    if not rows:
        return None
    thesis = dict(compare.get("thesis") or {})
    ranges = thesis_ranges(thesis)
    pooled = {c: _pooled(rows, f"n_{c}", "channels") for c in O3_CATEGORIES}
    verdict: dict[str, str | None] = dict.fromkeys(ranges)
    for c, (lo, hi) in ranges.items():
        v = pooled[c]
        if v is not None:
            verdict[c] = "inside" if lo - 1e-12 <= v <= hi + 1e-12 else "below" if v < lo else "above"
    return {"rows": rows, "pooled": pooled, "thesis": thesis, "ranges": ranges, "verdict": verdict,
            "models": rows[0]["models"] + 1, "rule": compare["rules"]["observation3"]}


def observation4(regression: Mapping) -> dict | None:
    """Observation 4 (Fig. 3.5): per layer, the mean recovered top-k of A (and held-out R²) at every sparsity m,
    the kept weights as they are (the thesis's) and refitted; the headline compares the map nearest 10% of B's
    channels (as kept) with all weights, averaged over layers."""
    summary = regression.get("summary") or []
    if not summary:
        return None
    layers = list(dict.fromkeys(r["layer"] for r in summary))
    columns = sorted({(r["fraction"], r["label"]) for r in summary if r["fraction"] is not None and not r["refit"]},
                     key=lambda x: x[0])
    table = []
    for layer in layers:
        mine = [r for r in summary if r["layer"] == layer]
        kept = {r["label"]: r for r in mine if r["fraction"] is not None and not r["refit"]}
        refit = {r["fraction"]: r for r in mine if r["refit"]}
        single = next((r for r in mine if r["fraction"] is None), None)
        cells = [{"label": label, **({"m": kept[label]["m"], "recovered": kept[label]["mean_recovered"],
                                       "r2": kept[label]["mean_r2"],
                                       "refit": (refit.get(fr) or {}).get("mean_recovered"),
                                       "refit_r2": (refit.get(fr) or {}).get("mean_r2")} if label in kept else {})}
                 for fr, label in columns]
        near = [r for r in kept.values() if r["fraction"] < 1]
        ten = min(near, key=lambda r: (abs(r["fraction"] - 0.1), r["fraction"]), default=None)
        full = next((r for r in kept.values() if r["fraction"] == 1.0), None)
        table.append({"layer": layer, "cells": cells, "single": None if single is None else single["mean_recovered"],
                      "ten": ten, "full": full})
    tens = [t["ten"]["mean_recovered"] for t in table if t["ten"] and t["ten"]["mean_recovered"] is not None]
    fulls = [t["full"]["mean_recovered"] for t in table if t["full"] and t["full"]["mean_recovered"] is not None]
    return {"columns": [label for _, label in columns], "table": table,
            "ten": float(np.mean(tens)) if tens else None, "full": float(np.mean(fulls)) if fulls else None,
            "info": regression.get("info") or {}, "hard": regression.get("hard_channels") or {}}


def merge_answer(results: Mapping, prefix: str) -> dict:
    """The N-model merge: every method's accuracy and its gap to the mean input model, per split."""
    many = results.get("many") or {}
    if not many.get("rows"):
        raise MergescopeError("the merge's results.json has no merge rows ('many')")
    n = len({e["model"] for e in many["endpoints"]})
    best = {split: max(s["gap"], key=s["gap"].get) for split, s in many["summary"].items()}
    return {"n": n, "rows": many["rows"], "summary": many["summary"], "best": best,
            "corrections": many.get("corrections") or {}, "report": f"{prefix}/{REPORT_NAME}",
            "csv": f"{prefix}/merges.csv"}


# -- example channels, chosen by the metric --------------------------------------------------------------------

def typical(candidates: Sequence[tuple[str, int, float]]) -> tuple[str, int, float, float] | None:
    """The most typical of (layer, channel, value) candidates: the one whose value is closest to their median
    (the first in order on a tie); returns (layer, channel, value, median)."""
    if not candidates:
        return None
    median = float(np.median([v for _, _, v in candidates]))
    layer, channel, value = min(candidates, key=lambda c: abs(c[2] - median))
    return layer, channel, value, median


def _usable(row: Mapping, metric: str) -> bool:
    flag = {"kendall_tau": "kendall_defined", "clip_delta": "clip_delta_defined"}.get(metric)
    return row.get(metric) is not None and not row["dead"] and (flag is None or bool(row.get(flag)))


def example_channels(tables: ChannelTables, compare: Mapping, regression: Mapping | None) -> dict[str, list[dict]]:
    """Per observation, two or three example channels: for each of its categories the most typical channel
    (:func:`typical` of the consensus metric among the channels of that category, pooled over layers).

    - Observation 1: "similar" and "not similar" (A vs the first aligned model, by the consensus metric's null);
    - Observation 2: "matched", the more frequent of "A" / "B" (one model dominates), then "neither", "mixed";
    - Observation 3: "all similar", "most similar", "all dissimilar" (then "few similar"), by the mean of the
      consensus metric over the aligned models;
    - Observation 4: of the regression's stored hard channels, the one with the largest R² gap (all weights vs
      sparse) and the one with the smallest.
    """
    metric = compare["rules"]["observation3"]["metric"]
    ref, model = next(iter(dict.fromkeys((s["reference"], s["model"]) for s in compare["layers"])))
    first = [r for rows in tables.compare.values() for r in rows
             if (r["reference"], r["model"]) == (ref, model) and _usable(r, metric)]

    def pick(candidates: Sequence[tuple[str | None, str, int, float]], categories: Sequence[str], limit: int):
        """(category, layer, channel, value) -> the typical channel of each category, in order, at most ``limit``."""
        chosen = []
        for cat in categories:
            found = typical([(layer, c, v) for k, layer, c, v in candidates if k == cat])
            if found and len(chosen) < limit:
                chosen.append({"category": cat, "layer": found[0], "channel": found[1], "value": found[2],
                               "median": found[3], "metric": metric})
        return chosen

    def judged(r: Mapping) -> str | None:
        s = r.get(f"similar_{metric}")
        return None if s is None else "similar" if s else "not similar"

    out = {"obs1": pick([(judged(r), r["layer"], r["channel"], r[metric]) for r in first],
                        ("similar", "not similar"), 2)}
    counts = {c: sum(1 for r in first if r.get("category") == c) for c in ("A", "B")}
    dominant, other = ("B", "A") if counts["B"] > counts["A"] else ("A", "B")
    out["obs2"] = pick([(r.get("category"), r["layer"], r["channel"], r[metric]) for r in first],
                       ("matched", dominant, "neither", "mixed", other), 3)
    consensus = []  # the mean of the metric over the aligned models, per channel with a consensus category
    for (layer, channel), rows in tables.compare.items():
        mine = [r for r in rows if r["reference"] == ref]
        vals = [r[metric] for r in mine if _usable(r, metric)]
        if mine and mine[0].get("consensus") and vals:
            consensus.append((mine[0]["consensus"], layer, channel, float(np.mean(vals))))
    out["obs3"] = pick(consensus, ("all similar", "most similar", "all dissimilar", "few similar"), 3)
    hard = [h for rows in ((regression or {}).get("hard_channels") or {}).values() for h in rows]
    if hard:
        most = max(hard, key=lambda h: h["gap"])
        least = min(hard, key=lambda h: h["gap"])
        out["obs4"] = [{"category": "needs many weights (largest R² gap)", "layer": most["layer"],
                        "channel": most["channel"], "value": most["gap"], "metric": "R² gap"}]
        if least is not most:
            out["obs4"].append({"category": "sparse weights suffice (smallest R² gap stored)", "layer": least["layer"],
                                "channel": least["channel"], "value": least["gap"], "metric": "R² gap"})
    return out


# -- the page ---------------------------------------------------------------------------------------------------

def _delta_names(compare: Mapping) -> dict[str, str]:
    kind = (compare.get("embedder") or {}).get("kind")
    return {"kendall_tau": "Kendall τ", "clip_delta": "CLIP-δ" if kind == "clip" else "fallback-δ",
            "overlap": "top-k overlap", "correlation": "matching correlation"}


def overview_context(study_dir: str | os.PathLike, parts: Mapping[str, os.PathLike]) -> dict:
    """Everything the overview shows, from the parts' stored results (no page written).

    Args:
        study_dir: the study folder (links are relative to it).
        parts: {"sweep", "features", "merge"} -> run folder, only those present.
    """
    study_dir = Path(study_dir)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise MergescopeError(f"unknown study part(s) {', '.join(unknown)}; allowed: {', '.join(PARTS)}")
    parts = {name: Path(p) for name, p in parts.items()}
    inside = [name for name, p in parts.items() if p.resolve() == study_dir.resolve()]
    if inside:
        raise MergescopeError(f"the study folder {study_dir} is the {inside[0]} part itself: its report.html would be "
                              "overwritten; give the folder that holds the parts")
    loaded = {name: _load(p) for name, p in parts.items()}
    rel = {name: _rel(p, study_dir) for name, p in parts.items()}
    ctx: dict = {"parts": rel, "models": _models(loaded), "dataset": _dataset(loaded), "names": {}, "rules": {},
                 "labels": {}, "files": {}, "figures": {}, "feature_pages": [], "consensus_metric": "",
                 **dict.fromkeys(("q1", "q2", "obs1", "obs2", "obs3", "obs4", "merge", "features_report"))}
    if "sweep" in loaded:
        ctx["q1"] = interpolation_answer(loaded["sweep"], rel["sweep"])
        figures = sorted((parts["sweep"] / "figures").glob("interpolation_*.svg"),
                         key=lambda p: (p.stem != "interpolation_test", p.stem))
        ctx["q1"]["figures"] = [f"{rel['sweep']}/figures/{p.name}" for p in figures]
    features = loaded.get("features") or {}
    compare, regression = features.get("compare"), features.get("regression")
    if compare:
        names = _delta_names(compare)
        ctx["names"] = names
        ctx["rules"] = compare["rules"]
        ctx["consensus_metric"] = names[compare["rules"]["observation3"]["metric"]]
        ctx["q2"] = partial_merge_answer(compare.get("partial_merge") or [], names)
        ctx["obs1"] = observation1(compare, names)
        ctx["obs2"] = observation2(compare)
        ctx["obs3"] = observation3(compare)
        ctx["labels"] = {s["model"]: model_label(s["model"]) for s in compare["layers"]}
        ctx["subset_size"] = compare.get("subset_size")
        ctx["embedder"] = compare.get("embedder")
    if regression:
        ctx["obs4"] = observation4(regression)
    if "features" in rel:
        fp = parts["features"]
        ctx["files"] = {name: f"{rel['features']}/{name}" for name in ("compare.csv", "partial_merge.csv",
                                                                      "regression.csv")
                        if (fp / name).is_file()}
        ctx["figures"] = {name: f"{rel['features']}/figures/{name}" for name in ("partial_merge.svg", "regression.svg")
                          if (fp / "figures" / name).is_file()}
        ctx["features_report"] = f"{rel['features']}/{REPORT_NAME}"
        ctx["feature_pages"] = [{"title": v.get("title", ""), "slug": v["slug"]}
                                for v in features.get("features", {}).get("views", [])]
    if "merge" in loaded:
        ctx["merge"] = merge_answer(loaded["merge"], rel["merge"])
        ctx["merge"]["figures"] = [f"{rel['merge']}/figures/{p.name}"
                                   for p in sorted((parts["merge"] / "figures").glob("merge_*_models_*.svg"))]
    return ctx


def _models(loaded: Mapping[str, Mapping]) -> list[dict]:
    """The study's models as the parts name them: tag and checkpoint (user strings, escaped by the template)."""
    summary = (loaded.get("features") or {}).get("summary") or {}
    tags = [k for k in summary if re.fullmatch(r"[A-Z]", k)]
    if tags:
        return [{"tag": t, "checkpoint": str(summary[t])} for t in tags]
    sweep = (loaded.get("sweep") or {}).get("summary") or {}
    if "model A" in sweep:
        return [{"tag": t, "checkpoint": str(sweep[f"model {t}"])} for t in ("A", "B") if f"model {t}" in sweep]
    many = ((loaded.get("merge") or {}).get("summary") or {}).get("models") or []
    return [{"tag": str(i), "checkpoint": str(c)} for i, c in enumerate(many)]


def _dataset(loaded: Mapping[str, Mapping]) -> str:
    for name in PARTS:
        d = ((loaded.get(name) or {}).get("summary") or {}).get("dataset")
        if d:
            return str(d)
    return ""


@staged("rendering")
def render_overview(study_dir: str | os.PathLike, parts: Mapping[str, os.PathLike], *,
                    all_channels: bool = True) -> Overview:
    """Write ``study_dir/report.html``: per question of the thesis the number and how it was judged, with example
    channels inline; with a feature study also one page per layer (``layers/``) and per channel (``channels/``).

    Args:
        study_dir: the study folder.
        parts: {"sweep", "features", "merge"} -> run folder (inside ``study_dir`` or not), only those present.
        all_channels: write a page for every channel of every layer (False: only the example channels').

    Returns:
        :class:`Overview` (path, files): the page and every file written, the page last.

    Example:
        >>> path, files = render_overview("runs/study", {"sweep": "runs/study/sweep",
        ...                                              "features": "runs/study/features"})
    """
    study_dir = Path(study_dir)
    ctx = overview_context(study_dir, parts)
    files: list[Path] = []
    examples: dict[str, list[dict]] = {}
    sheets = TileSheets(None, study_dir)
    ctx["layer_pages"] = []
    if "features" in parts and ctx.get("obs1"):
        fdir = Path(parts["features"])
        images = ChannelImages(fdir) if (fdir / "probe").is_dir() else None
        tables = ChannelTables.read(fdir)
        features = _load(fdir)
        examples = example_channels(tables, features["compare"], features.get("regression"))
        hrefs = {layer: layer_page(layer) for layer in tables.layers()}
        chosen = None if all_channels else sorted({(e["layer"], e["channel"]) for ex in examples.values() for e in ex})
        pages = render_channel_pages(study_dir, fdir, chosen, images=images, tables=tables, layer_href=hrefs)
        layer_pages = render_layer_pages(study_dir, fdir, tables, linked=set(pages))
        files += [*layer_pages.values(), *pages.values()]
        sheets = TileSheets(images, study_dir)
        ref, model = next(iter(dict.fromkeys((s["reference"], s["model"]) for s in features["compare"]["layers"])))
        merged = (ctx.get("obs2") or {}).get("merged")
        shows = {"obs1": (("pair",), {ref, model}), "obs2": (("pair",), {ref, model, merged}),
                 "obs3": (("many",), None), "obs4": (("regress",), None)}
        for key, found in examples.items():
            slugs, only = shows[key]
            for e in found:
                e["href"] = channel_page(e["layer"], e["channel"])
                e["metric_name"] = ctx["names"].get(e["metric"], e["metric"])
                e["rows"] = sheets.rows(e["layer"], e["channel"], slugs, only)
        tables_href = {layer: f"{ctx['parts']['features']}/features/{table_name(layer)}" for layer in hrefs
                       if (fdir / "features" / table_name(layer)).is_file()}
        ctx["layer_pages"] = [{"layer": layer, "href": href, "channels": len(tables.channels(layer)),
                               "table": tables_href.get(layer)} for layer, href in hrefs.items()]
    html = _environment().get_template("overview.html").render(
        title="mergescope study", examples=examples, sheets=sheets, tile=TILE, **ctx)
    path = atomic_write_text(study_dir / REPORT_NAME, html)
    return Overview(path, [*files, path])


__all__ = ["Overview", "example_channels", "interpolation_answer", "merge_answer", "observation1", "observation2",
           "observation3", "observation4", "overview_context", "partial_merge_answer", "render_overview",
           "thesis_ranges", "typical"]
