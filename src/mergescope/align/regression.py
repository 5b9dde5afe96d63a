"""Regression alignment (thesis 000 §3.2.4; paper 001 Observation 4): each channel of A as a linear combination
of all channels of the same group of B, and how sparse that combination can be.

For every channel i of A, ordinary least squares with intercept on B's channels, over images × positions at the
group's observation points of a fixed image subset (default: 5 images per class, :func:`regression_subset`):

    a_i ≈ W[i] · b + c_i,    W = Σ_AB (Σ_BB + λ·s·I)⁻¹,    c = μ_A − W μ_B,

with Σ the (population) covariances from the streamed normal equations (:class:`JointMoments`: means and the
full centred scatter of ``[a; b]`` in float64 — activations are never held), ``λ`` the optional ridge and
``s = mean(diag Σ_BB)`` (so λ is relative and scale-free). Singular systems (constant B channels) are solved
with the pseudo-inverse (minimum-norm solution: constant channels get weight 0).
R²_i = 1 − SSE_i / SST_i on the fitted samples; NaN for a constant A channel (nothing to explain).

Sparsity: keep the top-m weights of each row by magnitude (``rank_by="weight"``: |W_ij|, the thesis's rule;
``"contribution"``: |W_ij|·σ_Bj, scale-free), either as they are (intercept re-centred: the best intercept for
those weights) or refitted by least squares on the kept support (the normal equations restricted to it —
cheap from the same scatter). m is given as fractions of B's channels (1, 2, 5, 10, 25 %, all), at least 1.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..data import subset_per_class
from ..perm import PermSpec
from .covariance import JointMoments, group_covariances

DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.10, 0.25, 1.0)  # the sparsity sweep: m as a fraction of B's channels


@dataclass
class RegressionFit:
    """One group's regression of A's channels on B's channels (float64 tensors on the statistics' device).

    Attributes:
        weight: (C_A, C_B) map: a ≈ weight @ b + intercept.
        intercept: (C_A,).
        r2: (C_A,) coefficient of determination on the fitted samples (NaN for a constant A channel).
        m: weights kept per A channel (C_B for the full fit).
        fraction: the requested fraction of C_B (1.0 for the full fit).
        refit: whether the kept weights were refitted on their support.
        label: "all", "10%", "10% refit", …
    """

    weight: torch.Tensor
    intercept: torch.Tensor
    r2: torch.Tensor
    m: int
    fraction: float
    refit: bool
    label: str

    def row(self, group: str) -> dict:
        """A JSON-ready summary (R² over the non-constant A channels)."""
        r2 = self.r2[~torch.isnan(self.r2)].cpu().numpy()
        return {"group": group, "label": self.label, "fraction": self.fraction, "m": self.m, "refit": self.refit,
                "mean_r2": float(r2.mean()) if r2.size else None,
                "median_r2": float(np.median(r2)) if r2.size else None,
                "constant_a": int(torch.isnan(self.r2).sum())}


@dataclass
class RegressionResult:
    """Regression alignment of one model (B) to a reference (A), per group.

    Attributes:
        fits: group -> the full least-squares fit.
        sweep: group -> the sparse fits, by fraction, each without and with refit.
        ridge: the relative ridge λ used.
        samples: samples (images × positions × observation points) each group was fitted on.
    """

    fits: dict[str, RegressionFit]
    sweep: dict[str, list[RegressionFit]] = field(default_factory=dict)
    ridge: float = 0.0
    samples: dict[str, int] = field(default_factory=dict)

    def summary(self) -> list[dict]:
        """One JSON-ready row per group and fit (full fit first)."""
        rows = []
        for g, fit in self.fits.items():
            rows.append(fit.row(g))
            rows += [f.row(g) for f in self.sweep.get(g, [])]
        return rows

    def r2_table(self, group: str) -> dict[str, np.ndarray]:
        """label -> R² per A channel, for plotting R² against m."""
        return {f.label: f.r2.cpu().numpy() for f in [self.fits[group], *self.sweep.get(group, [])]}


def regression_subset(dataset, per_class: int = 5, seed: int = 0) -> np.ndarray:
    """The default fitting subset: ``per_class`` images of every class (ids, via :func:`subset_per_class`)."""
    return subset_per_class(dataset.targets, per_class, seed)


def _ridge_term(sbb: torch.Tensor, ridge: float) -> float:
    """λ·mean(diag S_BB): the ridge in the scatter's units."""
    return ridge * float(sbb.diagonal().mean()) if ridge > 0 else 0.0


def psd_pinv(g: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """Pseudo-inverse of symmetric PSD matrices (…, m, m): eigenvalues below ``rtol``·max are dropped."""
    e, v = torch.linalg.eigh(g)  # (…, m), (…, m, m)
    keep = e > rtol * e.amax(-1, keepdim=True).clamp_min(1e-300)
    inv = torch.where(keep, 1.0 / e.clamp_min(1e-300), torch.zeros_like(e))
    return (v * inv.unsqueeze(-2)) @ v.transpose(-1, -2)


def _psd_solve(g: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Minimum-norm solution of g x = rhs for a batch of PSD ``g`` (…, m, m) and ``rhs`` (…, m)."""
    return (psd_pinv(g) @ rhs.unsqueeze(-1)).squeeze(-1)


def _r2(stats: JointMoments, weight: torch.Tensor) -> torch.Tensor:
    """R² per A channel of ``a ≈ weight @ b + best intercept``, from the scatter (no samples needed)."""
    sst = stats.saa.diagonal()  # (C_A,)
    sse = sst - 2 * (weight * stats.sab).sum(1) + ((weight @ stats.sbb) * weight).sum(1)
    constant = sst <= 1e-12 * sst.amax().clamp_min(1e-300)
    return torch.where(constant, torch.full_like(sst, math.nan), 1 - sse.clamp_min(0) / sst.clamp_min(1e-300))


def _label(fraction: float, refit: bool) -> str:
    base = "all" if fraction >= 1 else f"{fraction * 100:g}%"
    return base + (" refit" if refit else "")


def _intercept(stats: JointMoments, weight: torch.Tensor) -> torch.Tensor:
    return stats.mean_a - weight @ stats.mean_b


def regression_fit(stats: JointMoments, ridge: float = 0.0) -> RegressionFit:
    """The full least-squares map of A's channels on B's (see the module docstring).

    Args:
        stats: joint statistics with a = A's features, b = B's (:func:`group_covariances`).
        ridge: relative ridge λ ≥ 0 (0: ordinary least squares, pseudo-inverse where singular).
    """
    sbb, sab = stats.sbb, stats.sab  # (C_B, C_B), (C_A, C_B)
    g = sbb + _ridge_term(sbb, ridge) * torch.eye(len(sbb), dtype=sbb.dtype, device=sbb.device)
    weight = sab @ psd_pinv(g)  # (C_A, C_B); g is symmetric
    return RegressionFit(weight, _intercept(stats, weight), _r2(stats, weight), len(sbb), 1.0, False, "all")


def keep_count(fraction: float, channels: int) -> int:
    """Weights kept for a fraction of ``channels``: round half up, at least 1, at most all."""
    return int(min(channels, max(1, math.floor(fraction * channels + 0.5))))


def sparsify(stats: JointMoments, fit: RegressionFit, fraction: float, refit: bool, ridge: float = 0.0,
             rank_by: str = "weight") -> RegressionFit:
    """Keep the top-m weights per A channel of ``fit`` (m = :func:`keep_count`), refitted on the support or not.

    Args:
        stats: the statistics ``fit`` came from.
        fit: the full fit whose weights are ranked.
        fraction: m as a fraction of B's channels (1.0 keeps all).
        refit: solve the normal equations restricted to the kept support (with the same ridge).
        rank_by: "weight" (|W|) or "contribution" (|W|·σ_B).
    """
    c_b = fit.weight.shape[1]
    m = keep_count(fraction, c_b)
    score = fit.weight.abs()
    if rank_by == "contribution":
        score = score * stats.sbb.diagonal().clamp_min(0).sqrt()
    elif rank_by != "weight":
        raise ValueError(f"rank_by must be 'weight' or 'contribution', got {rank_by!r}")
    support = score.topk(m, dim=1).indices  # (C_A, m), largest first
    if refit:
        if m == c_b:
            weight = regression_fit(stats, ridge).weight
        else:
            sbb = stats.sbb
            g = sbb[support.unsqueeze(-1), support.unsqueeze(-2)]  # (C_A, m, m)
            g = g + _ridge_term(sbb, ridge) * torch.eye(m, dtype=g.dtype, device=g.device)
            rhs = stats.sab.gather(1, support)  # (C_A, m)
            weight = torch.zeros_like(fit.weight).scatter_(1, support, _psd_solve(g, rhs))
    else:
        weight = torch.zeros_like(fit.weight).scatter_(1, support, fit.weight.gather(1, support))
    return RegressionFit(weight, _intercept(stats, weight), _r2(stats, weight), m, fraction, refit,
                         _label(fraction, refit))


def sparsity_sweep(stats: JointMoments, fit: RegressionFit, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                   ridge: float = 0.0, rank_by: str = "weight") -> list[RegressionFit]:
    """:func:`sparsify` at every fraction, without and with refit (labelled "10%" and "10% refit")."""
    return [sparsify(stats, fit, f, refit, ridge, rank_by) for f in fractions for refit in (False, True)]


def regress_many(
    reference: nn.Module,
    others: Sequence[nn.Module],
    spec: PermSpec,
    batches: Iterable,
    ridge: float = 0.0,
    fractions: Sequence[float] | None = DEFAULT_FRACTIONS,
    rank_by: str = "weight",
    device: torch.device | str = "cpu",
    progress: bool = False,
    total: int | None = None,
) -> list[RegressionResult]:
    """Regression alignment of every model in ``others`` onto ``reference``, in ONE data pass.

    Args:
        reference: model A, whose channels are explained.
        others: the models B whose channels explain them.
        spec: the permutation spec (groups and their observation points).
        batches: the fitting data, e.g. ``iter_batches(ds, 50, ids=regression_subset(ds))``.
        ridge: relative ridge λ (see the module docstring).
        fractions: the sparsity sweep (None: only the full fit).
        rank_by: how the sweep ranks weights ("weight" or "contribution").

    Returns:
        One :class:`RegressionResult` per model in ``others``.

    Example:
        >>> ids = regression_subset(train)
        >>> [res] = regress_many(model_a, [model_b], spec, iter_batches(train, 50, ids=ids))
        >>> res.fits["features.0"].r2.nanmean()
    """
    all_stats = group_covariances(reference, others, spec, batches, device=device, progress=progress, total=total)
    return [regression_from_stats(stats, ridge, fractions, rank_by) for stats in all_stats]


def regression_from_stats(stats: dict[str, JointMoments], ridge: float = 0.0,
                          fractions: Sequence[float] | None = DEFAULT_FRACTIONS,
                          rank_by: str = "weight") -> RegressionResult:
    """The regression alignment (full fits and sparsity sweep) from already collected group statistics."""
    fits, sweep = {}, {}
    for g, st in stats.items():
        fits[g] = regression_fit(st, ridge)
        if fractions:
            sweep[g] = sparsity_sweep(st, fits[g], fractions, ridge, rank_by)
    return RegressionResult(fits, sweep, ridge, {g: st.n for g, st in stats.items()})


def regression_alignment(model_a: nn.Module, model_b: nn.Module, spec: PermSpec, batches: Iterable,
                         **kw) -> RegressionResult:
    """Regression alignment of ``model_b`` onto ``model_a`` (see :func:`regress_many`)."""
    return regress_many(model_a, [model_b], spec, batches, **kw)[0]
