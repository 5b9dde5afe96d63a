"""One page per layer of a study: the metrics' histograms and every channel in a table sortable and filterable by
any metric or category, each channel linked to its page (:mod:`mergescope.report.channel_pages`).

Read from the feature study's ``compare.csv`` and ``regression.csv`` (:class:`ChannelTables`); nothing computed.
"""
from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from markupsafe import Markup

from ..runs.atomic import atomic_write_text
from ..timing import staged
from .channel_pages import METRIC_NAMES, ChannelTables, channel_page
from .compare_pages import _safe, model_label, table_name
from .feature_data import script_json
from .html import FIGURES_DIR, _environment

LAYERS_DIR = "layers"
_TEXT_COLUMNS = (("category", "Obs. 2 category"), ("consensus", "Obs. 3 consensus"))


def layer_page(layer: str) -> str:
    """Path of a layer's page relative to the study folder."""
    return f"{LAYERS_DIR}/{_safe(layer)}.html"


def _full_fit(rows) -> dict | None:
    return max(rows, key=lambda r: (r["m"], not r["refit"]), default=None)


def layer_table(tables: ChannelTables, layer: str, linked: Collection[tuple[str, int]] | None = None,
                ) -> tuple[list[dict], list[dict]]:
    """Headers ({"name", "num"}) and rows ({"channel", "href", "dead", "cells": [{"text", "sort", "similar"}]})
    of one layer's channel table (hrefs relative to the study folder; None for a channel not in ``linked``)."""
    channels = tables.channels(layer)
    models = list(dict.fromkeys(r["model"] for c in channels for r in tables.compare.get((layer, c), [])))
    headers = []
    for m in models:
        headers += [{"name": f"{tables.delta if metric == 'clip_delta' else name} {model_label(m)}", "num": True,
                     "key": (m, metric)} for metric, name in METRIC_NAMES]
    present = {col for c in channels for r in tables.compare.get((layer, c), [])
               for col, _ in _TEXT_COLUMNS if r.get(col)}
    headers += [{"name": name, "num": False, "key": ("", col)} for col, name in _TEXT_COLUMNS if col in present]
    has_regression = any((layer, c) in tables.regression for c in channels)
    if has_regression:
        headers += [{"name": n, "num": True, "key": ("regression", k)}
                    for k, n in (("r2_heldout", "R² all weights (held-out)"),
                                 ("recovered", "recovered top-k, all weights"),
                                 ("recovered_1", "recovered top-k, m = 1 (as kept)"))]
    headers = [h for h in headers if h["key"][1] != "clip_delta" or any(
        r.get("clip_delta") is not None for c in channels for r in tables.compare.get((layer, c), []))]
    rows = []
    for c in channels:
        by_model = {r["model"]: r for r in tables.compare.get((layer, c), [])}
        reg = tables.regression.get((layer, c), [])
        full, one = _full_fit(reg), next((r for r in reg if r["m"] == 1 and not r["refit"]), None)
        cells = []
        for h in headers:
            model, col = h["key"]
            if model == "regression":
                src = one if col == "recovered_1" else full
                v = None if src is None else src["recovered" if col == "recovered_1" else col]
                cells.append({"text": "" if v is None else f"{v:.3f}", "sort": "" if v is None else f"{v:.6g}",
                              "similar": False})
            elif model == "":
                text = next((x.get(col) for x in by_model.values() if x.get(col)), "") or ""
                cells.append({"text": text, "sort": text, "similar": False})
            else:
                r = by_model.get(model, {})
                v = r.get(col)
                cells.append({"text": "" if v is None else f"{v:.3f}",
                              "sort": "" if v is None or r.get("dead") else f"{v:.6g}",
                              "similar": bool(r.get(f"similar_{col}"))})
        dead = any(r["dead"] for r in by_model.values())
        href = channel_page(layer, c) if linked is None or (layer, c) in linked else None
        rows.append({"channel": c, "href": href, "dead": dead, "cells": cells})
    return [{"name": h["name"], "num": h["num"]} for h in headers], rows


def table_data(headers: list[dict], rows: list[dict]) -> dict:
    """The rows of :func:`layer_table` as the page's data, drawn by its script: per channel [channel, dead, href or
    None, cells...], a numeric cell ``null`` (empty), its value (6 significant digits, shown with 3 decimals) or
    [value, similar, sortable], a text cell the number of its text in ``texts``."""
    texts: dict[str, int] = {}
    out = []
    for r in rows:
        cells: list = []
        for h, c in zip(headers, r["cells"]):
            if not h["num"]:
                cells.append(texts.setdefault(c["text"], len(texts)))
            elif c["text"] == "":
                cells.append(None)
            elif c["sort"] and not c["similar"]:
                cells.append(float(c["sort"]))
            else:
                cells.append([float(c["sort"] or c["text"]), int(c["similar"]), int(bool(c["sort"]))])
        out.append([r["channel"], int(r["dead"]), r["href"], *cells])
    return {"rows": out, "texts": list(texts)}


@staged("rendering")
def render_layer_pages(study_dir: str | os.PathLike, features_dir: str | os.PathLike,
                       tables: ChannelTables | None = None, linked: Collection[tuple[str, int]] | None = None,
                       ) -> dict[str, Path]:
    """Write ``study_dir/layers/<layer>.html`` for every layer of the feature study in ``features_dir``.

    Args:
        linked: the (layer, channel) whose channel pages exist (default: all): only those are linked.

    Returns:
        layer -> the page written.
    """
    study_dir, features_dir = Path(study_dir), Path(features_dir)
    tables = tables or ChannelTables.read(features_dir)
    template = _environment().get_template("layer.html")
    written = {}
    for layer in tables.layers():
        path = study_dir / layer_page(layer)
        root = Path(os.path.relpath(study_dir, path.parent)).as_posix()
        feats = Path(os.path.relpath(features_dir, path.parent)).as_posix()
        histogram = features_dir / FIGURES_DIR / f"compare_{_safe(layer)}.svg"
        table = features_dir / "features" / table_name(layer)
        headers, rows = layer_table(tables, layer, linked)
        filters = [sorted({r["cells"][i]["text"] for r in rows} - {""}) if not h["num"] else None
                   for i, h in enumerate(headers)]
        html = template.render(
            title=f"Layer {layer}", layer=layer, root=root, headers=headers, filters=filters,
            data=Markup(script_json(table_data(headers, rows))),
            histogram=f"{feats}/{FIGURES_DIR}/{histogram.name}" if histogram.is_file() else None,
            channel_table=f"{feats}/features/{table.name}" if table.is_file() else None)
        written[layer] = atomic_write_text(path, html)
    return written


__all__ = ["LAYERS_DIR", "layer_page", "layer_table", "render_layer_pages", "table_data"]
