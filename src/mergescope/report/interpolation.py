"""Interpolation curves as plain rows: grouping, barriers, midpoints and the CSV form.

A row is a dict ``{"method", "alpha", "split", "loss", "accuracy"}`` describing the merged model
θ(α) = α·θ_A + (1−α)·P(θ_B) of one method, evaluated on one split. ``accuracy`` is a fraction in [0, 1].

A method's *corrections* say which points of the architecture its fix corrects (a study's ``corrections``,
e.g. ``permuted+repair`` on a ResNet: every residual block output through an added layer, every BatchNorm reset;
``permuted+repair_preact``: the pre-activation outputs, fused; ``permuted+reset``: BatchNorm statistics only).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from mergescope.errors import MergescopeError
from mergescope.runs.csvio import write_rows

COLUMNS = ("method", "alpha", "split", "loss", "accuracy")
_ALPHA_TOL = 1e-6
_SPLIT_ORDER = ("test", "train")


def _check_row(row: Mapping) -> dict:
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise MergescopeError(f"interpolation row {dict(row)!r} lacks {', '.join(missing)}")
    return {
        "method": str(row["method"]),
        "alpha": float(row["alpha"]),
        "split": str(row["split"]),
        "loss": float(row["loss"]),
        "accuracy": float(row["accuracy"]),
    }


def methods(rows: Iterable[Mapping]) -> list[str]:
    """Method names in the order they first appear."""
    return list(dict.fromkeys(str(r["method"]) for r in rows))


def splits(rows: Iterable[Mapping]) -> list[str]:
    """Split names: ``test`` first, then ``train``, then any others alphabetically."""
    names = {str(r["split"]) for r in rows}
    known = [s for s in _SPLIT_ORDER if s in names]
    return known + sorted(names - set(known))


def curves(rows: Iterable[Mapping]) -> dict[tuple[str, str], list[dict]]:
    """Group rows by ``(method, split)`` (first-seen order), each curve sorted by α.

    Raises MergescopeError on a missing column or a repeated α within one curve.
    """
    grouped: dict[tuple[str, str], list[dict]] = {}
    for raw in rows:
        row = _check_row(raw)
        grouped.setdefault((row["method"], row["split"]), []).append(row)
    for (method, split), curve in grouped.items():
        curve.sort(key=lambda r: r["alpha"])
        for a, b in zip(curve, curve[1:]):
            if abs(a["alpha"] - b["alpha"]) <= _ALPHA_TOL:
                raise MergescopeError(f"method {method!r} on split {split!r} has two rows at α = {a['alpha']:g}")
    return grouped


def _endpoint(curve: Sequence[dict], alpha: float) -> dict:
    for row in curve:
        if abs(row["alpha"] - alpha) <= _ALPHA_TOL:
            return row
    first = curve[0]
    raise MergescopeError(f"method {first['method']!r} on split {first['split']!r} has no row at α = {alpha:g}")


def value_at(curve: Sequence[dict], key: str, alpha: float) -> float:
    """``key`` of a sorted curve at ``alpha``, linearly interpolated between neighbouring rows."""
    for lo, hi in zip(curve, curve[1:]):
        if lo["alpha"] - _ALPHA_TOL <= alpha <= hi["alpha"] + _ALPHA_TOL:
            if abs(alpha - lo["alpha"]) <= _ALPHA_TOL:
                return lo[key]
            if abs(alpha - hi["alpha"]) <= _ALPHA_TOL:
                return hi[key]
            t = (alpha - lo["alpha"]) / (hi["alpha"] - lo["alpha"])
            return (1 - t) * lo[key] + t * hi[key]
    if len(curve) == 1 and abs(curve[0]["alpha"] - alpha) <= _ALPHA_TOL:
        return curve[0][key]
    return math.nan


def _evaluated_at(curve: Sequence[dict], key: str, alpha: float) -> float:
    """``key`` of the row at ``alpha``; NaN when the curve has no such row."""
    return next((r[key] for r in curve if abs(r["alpha"] - alpha) <= _ALPHA_TOL), math.nan)


def _max_gap(curve: Sequence[dict], key: str, sign: float, ends: Mapping[str, tuple[float, float]] | None
             ) -> tuple[float, float]:
    """Largest ``sign·(f(α) − line(α))`` over the curve, and the α where it occurs (NaN if any value is NaN).

    The line joins the curve's own values at α = 0 and 1, or ``ends[key]`` = (value at 0, value at 1) if given.
    """
    start, end = ends[key] if ends else (_endpoint(curve, 0.0)[key], _endpoint(curve, 1.0)[key])
    gaps = [(sign * (r[key] - ((1 - r["alpha"]) * start + r["alpha"] * end)), r["alpha"]) for r in curve]
    if any(math.isnan(g) for g, _ in gaps):
        return math.nan, math.nan
    return max(gaps, key=lambda ga: ga[0])


def model_ends(endpoints: Iterable[Mapping] | None) -> dict[str, dict[str, tuple[float, float]]]:
    """split -> {"loss": (L_B, L_A), "accuracy": (Acc_B, Acc_A)} from the endpoint records of models "A" and "B"
    that hold model, split, loss and accuracy (others are not endpoints of a barrier)."""
    by = {(e["model"], e["split"]): e for e in endpoints or ()
          if all(k in e for k in ("model", "split", "loss", "accuracy"))}
    return {split: {k: (by["B", split][k], by["A", split][k]) for k in ("loss", "accuracy")}
            for (model, split) in by if model == "A" and ("B", split) in by}


def barriers(rows: Iterable[Mapping], endpoints: Iterable[Mapping] | None = None,
             corrections: Mapping[str, str] | None = None) -> list[dict]:
    """Barrier and midpoint of every ``(method, split)`` curve, in first-seen order.

    With L(α), Acc(α) the loss and accuracy of θ(α), and the endpoints L(0), L(1), Acc(0), Acc(1):

    - ``loss_barrier``     = max_α [ L(α) − ((1−α)·L(0) + α·L(1)) ]
    - ``accuracy_barrier`` = max_α [ ((1−α)·Acc(0) + α·Acc(1)) − Acc(α) ]

    so a positive number is a drop in quality for both. The endpoints are models B (α = 0) and A (α = 1)
    themselves when ``endpoints`` (records with model, split, loss, accuracy) holds both for the split, else each
    method's own values at α = 0 and 1. The two agree for permutation merges; a map-based merge at α = 0 is B
    rewritten in A's basis, an approximation that can be much worse than B, so its own endpoints would hide its
    barrier. ``alpha_at_loss_barrier`` is the maximising α, and ``midpoint_loss`` / ``midpoint_accuracy`` are
    L(0.5) / Acc(0.5) — NaN when α = 0.5 was not evaluated (never interpolated: between α = 1/3 and 2/3 the
    curve can be anything). Values are NaN when the curve contains NaN. A curve without a row at α = 0 or α = 1 raises MergescopeError. ``corrects`` is the method's entry of
    ``corrections`` (which points its fix corrects; empty when not given).
    """
    ends = model_ends(endpoints)
    out = []
    for (method, split), curve in curves(rows).items():
        _endpoint(curve, 0.0), _endpoint(curve, 1.0)  # every curve spans the whole path
        loss_barrier, alpha_at = _max_gap(curve, "loss", +1.0, ends.get(split))
        accuracy_barrier, _ = _max_gap(curve, "accuracy", -1.0, ends.get(split))
        out.append({
            "method": method,
            "split": split,
            "loss_barrier": loss_barrier,
            "accuracy_barrier": accuracy_barrier,
            "alpha_at_loss_barrier": alpha_at,
            "midpoint_loss": _evaluated_at(curve, "loss", 0.5),
            "midpoint_accuracy": _evaluated_at(curve, "accuracy", 0.5),
            "corrects": (corrections or {}).get(method, ""),
        })
    return out


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping]) -> Path:
    """Write rows to ``path`` with columns method, alpha, split, loss, accuracy (atomically, through the one CSV
    writer :func:`mergescope.runs.csvio.write_rows`); return the path.

    Floats are written in their shortest round-trip form, so :func:`read_csv` gives back equal values.
    """
    return write_rows(path, COLUMNS, [_check_row(r) for r in rows])


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Read rows written by :func:`write_csv`; alpha, loss and accuracy come back as floats."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise MergescopeError(f"{path}: interpolation CSV lacks column(s) {', '.join(missing)}")
        return [_check_row(r) for r in reader]
