"""The one-sentence answer at the top of a report, computed from the interpolation rows."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from mergescope.report.formatting import percent
from mergescope.report.interpolation import barriers, curves, splits, value_at

BASELINE = "naive"
MIDPOINT = 0.5


def best_and_baseline(stats: Sequence[Mapping], split: str) -> tuple[Mapping | None, Mapping | None]:
    """Among :func:`barriers` entries of ``split``: the non-baseline method with the highest midpoint
    accuracy (None if there is none) and the ``naive`` baseline (None if absent)."""
    mine = [s for s in stats if s["split"] == split]
    baseline = next((s for s in mine if s["method"].lower() == BASELINE), None)
    others = [s for s in mine if s is not baseline and not math.isnan(s["midpoint_accuracy"])]
    best = max(others, key=lambda s: s["midpoint_accuracy"], default=None)
    return best, baseline


def _endpoint_accuracies(rows: list[Mapping], endpoints: Iterable[Mapping], split: str, method: str) -> tuple[float, float]:
    """Accuracy of model A and model B on ``split``: from ``endpoints``, else from ``method``'s curve at α = 1 / 0."""
    given = {str(e.get("model")).upper(): float(e["accuracy"]) for e in endpoints
             if str(e.get("split")) == split and "accuracy" in e}
    curve = curves(rows).get((method, split), [])
    a = given.get("A", value_at(curve, "accuracy", 1.0) if curve else math.nan)
    b = given.get("B", value_at(curve, "accuracy", 0.0) if curve else math.nan)
    return a, b


def headline(rows: Iterable[Mapping], endpoints: Iterable[Mapping] = (), split: str | None = None) -> str:
    """E.g. "At α = 0.5, permuted+repair reaches 93.1% test accuracy vs 12.4% for the direct average
    (endpoints: model A 97.2%, model B 96.9%)."

    ``split`` defaults to ``test`` when present. The featured method is the non-``naive`` method with the
    best accuracy at α = 0.5, compared with ``naive`` if present, else with the weakest other method;
    with only ``naive``, the sentence describes the direct average alone.
    """
    rows = list(rows)
    if not rows:
        return "No interpolation results were recorded."
    split = split or splits(rows)[0]
    stats = barriers(rows)
    best, baseline = best_and_baseline(stats, split)
    lead = best or baseline
    if lead is None:
        return f"No interpolation results were recorded on the {split} split."
    a, b = _endpoint_accuracies(rows, endpoints, split, lead["method"])
    name = lead["method"] if best else "the direct average"
    sentence = f"At α = {MIDPOINT:g}, {name} reaches {percent(lead['midpoint_accuracy'])} {split} accuracy"
    if best and baseline:
        sentence += f" vs {percent(baseline['midpoint_accuracy'])} for the direct average"
    elif best:
        rest = [s for s in stats if s["split"] == split and s is not best and not math.isnan(s["midpoint_accuracy"])]
        worst = min(rest, key=lambda s: s["midpoint_accuracy"], default=None)
        if worst is not None:
            sentence += f" vs {percent(worst['midpoint_accuracy'])} for {worst['method']}, the weakest"
    return sentence + f" (endpoints: model A {percent(a)}, model B {percent(b)})."
