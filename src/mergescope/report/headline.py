"""The one-sentence answer at the top of a report, computed from the interpolation rows.

The sentence answers the thesis's first question (000 Fig. 3.1, DESIGN.md step 3): does the merge path θ(α) cross
a barrier between the endpoints? So it features the merge with the smallest *accuracy barrier*
(:func:`mergescope.report.interpolation.barriers`: max over α of the straight line from Acc(B) at α = 0 to Acc(A)
at α = 1 minus Acc(α); positive = a drop below the line), not the one with the best accuracy at α = 0.5: a
map-based merge can be best at the midpoint while its α = 0 end, B rewritten in A's basis, is far below model B.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from mergescope.report.formatting import percent, points
from mergescope.report.interpolation import barriers, curves, model_ends, splits, value_at

BASELINE = "naive"
MIDPOINT = 0.5


def direct_average(stats: Sequence[Mapping], split: str) -> Mapping | None:
    """The ``naive`` (direct average) entry of ``split`` among :func:`barriers` entries; None if absent."""
    return next((s for s in stats if s["split"] == split and s["method"].lower() == BASELINE), None)


def _merges(stats: Sequence[Mapping], split: str) -> list[Mapping]:
    """The non-``naive`` entries of ``split`` whose accuracy barrier is a number (the ones Q1 can rank)."""
    return [s for s in stats if s["split"] == split and s["method"].lower() != BASELINE
            and not math.isnan(s["accuracy_barrier"])]


def _midpoint_or_lowest(s: Mapping) -> float:
    return -math.inf if math.isnan(s["midpoint_accuracy"]) else s["midpoint_accuracy"]


def lowest_barrier(stats: Sequence[Mapping], split: str) -> Mapping | None:
    """Q1's answer (000 Fig. 3.1): among the non-``naive`` :func:`barriers` entries of ``split``, the one with the
    smallest accuracy barrier; equal barriers go to the higher accuracy at α = 0.5 (an unevaluated midpoint counts
    lowest), then to the first seen. Entries whose barrier is NaN are skipped; None if none is left."""
    return min(_merges(stats, split), key=lambda s: (s["accuracy_barrier"], -_midpoint_or_lowest(s)), default=None)


def best_midpoint(stats: Sequence[Mapping], split: str) -> Mapping | None:
    """Among the same entries as :func:`lowest_barrier` (non-``naive``, a number barrier), the one with the highest
    accuracy at α = 0.5 (NaN midpoints skipped; None if none is left). Not Q1's answer: named beside it, with its
    barrier, when it is another merge."""
    ranked = [s for s in _merges(stats, split) if not math.isnan(s["midpoint_accuracy"])]
    return max(ranked, key=lambda s: s["midpoint_accuracy"], default=None)


def against_models(endpoints: Iterable[Mapping] | None, split: str) -> bool:
    """Whether :func:`barriers` measures ``split``'s barriers against models B (α = 0) and A (α = 1) themselves,
    i.e. ``endpoints`` holds both; else each method's own values at α = 0 and 1 are the line's ends."""
    return split in model_ends(endpoints)


def _endpoint_accuracies(rows: list[Mapping], endpoints: Iterable[Mapping], split: str, method: str) -> tuple[float, float]:
    """Accuracy of model A and model B on ``split``: from ``endpoints``, else from ``method``'s curve at α = 1 / 0."""
    given = {str(e.get("model")).upper(): float(e["accuracy"]) for e in endpoints
             if str(e.get("split")) == split and "accuracy" in e}
    curve = curves(rows).get((method, split), [])
    a = given.get("A", value_at(curve, "accuracy", 1.0) if curve else math.nan)
    b = given.get("B", value_at(curve, "accuracy", 0.0) if curve else math.nan)
    return a, b


def _at_midpoint(s: Mapping) -> str:
    return f"{percent(s['midpoint_accuracy'])} at α = {MIDPOINT:g}"


def headline(rows: Iterable[Mapping], endpoints: Iterable[Mapping] = (), split: str | None = None) -> str:
    """E.g. "permuted+repair has the smallest test accuracy barrier, +1.6 pts (the largest drop of accuracy
    below the straight line from model B at α = 0 to model A at α = 1), and reaches 96.0% at α = 0.5; the direct
    average +85.0 pts, 12.0% at α = 0.5; regression+repair, the best at α = 0.5 (98.1%), has a barrier of +28.3
    pts (endpoints: model A 97.2%, model B 96.9%)."

    ``split`` defaults to ``test`` when present. Barriers are measured against models A and B when ``endpoints``
    holds both (model, split, loss, accuracy) for the split, else against each method's own α = 0 and 1 values.
    The featured method is :func:`lowest_barrier`, compared with ``naive`` if present, else with the method of
    the largest barrier; the method with the best accuracy at α = 0.5 is named with its barrier when it is a
    different one. With only ``naive``, the sentence describes the direct average alone.
    """
    rows = list(rows)
    if not rows:
        return "No interpolation results were recorded."
    endpoints = list(endpoints)
    split = split or splits(rows)[0]
    stats = barriers(rows, endpoints)
    best, base = lowest_barrier(stats, split), direct_average(stats, split)
    lead = best or base
    if lead is None:
        if any(s["split"] == split for s in stats):
            return f"No merge has a finite accuracy barrier on the {split} split."
        return f"No interpolation results were recorded on the {split} split."
    line = ("from model B at α = 0 to model A at α = 1" if against_models(endpoints, split)
            else "between the method's own accuracies at α = 0 and α = 1")
    opening = (f"{best['method']} has the smallest {split} accuracy barrier, " if best
               else f"The direct average (naive) has a {split} accuracy barrier of ")
    sentence = (f"{opening}{points(lead['accuracy_barrier'])} (the largest drop of accuracy below the straight "
                f"line {line}), and reaches {_at_midpoint(lead)}")
    if best and base:
        sentence += f"; the direct average {points(base['accuracy_barrier'])}, {_at_midpoint(base)}"
    elif best:
        rest = [s for s in _merges(stats, split) if s is not best]
        worst = max(rest, key=lambda s: s["accuracy_barrier"], default=None)
        if worst is not None:
            sentence += f"; the largest, {points(worst['accuracy_barrier'])}, is {worst['method']}'s"
    top = best_midpoint(stats, split)
    if best and top is not None and top is not best:
        sentence += (f"; {top['method']}, the best at α = {MIDPOINT:g} ({percent(top['midpoint_accuracy'])}), "
                     f"has a barrier of {points(top['accuracy_barrier'])}")
    a, b = _endpoint_accuracies(rows, endpoints, split, lead["method"])
    return sentence + f" (endpoints: model A {percent(a)}, model B {percent(b)})."
