"""From a stored probe to feature views: which models form the rows of each layer's page."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .features import FeatureView


def views_from_probe(
    probe,
    rows: Mapping[str, str],
    slug: str,
    title: str,
    layers: Sequence[str] | None = None,
    channel_info: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    note: str = "",
) -> list[FeatureView]:
    """One :class:`FeatureView` per layer whose rows are the top-k images of the given probed models.

    Args:
        probe: a :class:`mergescope.probe.ProbeResult`.
        rows: row label -> model name in the probe, in display order (channel c of every row must be one unit:
            use aligned models, or an unaligned one on purpose, labelled so).
        layers: layers to show (default: every layer probed in the first row's model).
        channel_info: layer -> {metric name: value per channel} shown beside each channel.
    """
    first = next(iter(rows.values()))
    layers = list(layers) if layers is not None else list(probe.probes[first])
    views = []
    for layer in layers:
        ids = {label: probe[model, layer].topk_ids.numpy() for label, model in rows.items()}
        values = {label: probe[model, layer].topk_values.numpy() for label, model in rows.items()}
        info = dict((channel_info or {}).get(layer, {}))
        views.append(FeatureView(slug, title, layer, ids, values, info, note))
    return views


def matching_info(spec, matches: Mapping[str, object], layers: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per layer, the matched correlation of each channel for every aligned model (label -> MatchResult)."""
    info: dict[str, dict[str, np.ndarray]] = {}
    for layer in layers:
        group = spec.layers[layer].group if layer in spec.layers else None
        if group is None:
            continue
        info[layer] = {f"corr {label}": m.matched_similarity(group) for label, m in matches.items()
                       if m.method == "activation"}
    return info
