"""Regression alignment (thesis 000 §3.2.4; paper 001 Observation 4): each channel of A as a linear combination
of all channels of the same group of B, and how sparse that combination can be.

For every channel i of A, ordinary least squares with intercept on B's channels, over images × positions at the
group's observation points of a fixed **fitting subset** F (default: the thesis's 5,000 images, class-stratified,
capped by the dataset — :func:`regression_subsets`):

    a_i ≈ W[i] · b + c_i,    W = Σ_AB (Σ_BB + λ·s·I)⁻¹,    c = μ_A − W μ_B,

with Σ the (population) covariances from the streamed normal equations (:class:`JointMoments`: means and the
full centred scatter of ``[a; b]``, float32 products of each batch summed in float64 — activations are never
held), ``λ`` the optional ridge and
``s = mean(diag Σ_BB)`` (so λ is relative and scale-free). Singular systems (constant B channels) are solved
with the pseudo-inverse (minimum-norm solution: constant channels get weight 0).

**R² is judged out of sample**, on a held-out subset H of images disjoint from F (:func:`regression_subsets`):

    R²_i = 1 − Σ_H (a_i − W[i]·b − c_i)² / Σ_H (a_i − ā_i^H)²,

the fitted map (W, c) on H's samples against H's own mean (like ``sklearn``'s ``r2_score`` on test data: it can
be negative). It needs only H's moments: with H's mean μ^H and scatter S^H,
Σ_H (a − Wb − c)² = S^H_aa − 2 (W∘S^H_ab)1 + diag(W S^H_bb Wᵀ) + n_H (μ^H_a − W μ^H_b − c)².
NaN for an A channel constant on F or on H (nothing fitted or nothing to explain). The in-sample R² (on F
itself) is kept as ``r2_fit``: with few images and many channels it is 1 by construction (50 images, 513
unknowns), which is why it is not the headline.

Sparsity: keep the top-m weights of each row by magnitude (``rank_by="weight"``: |W_ij|, the thesis's rule;
``"contribution"``: |W_ij|·σ_Bj, scale-free), either as they are (intercept re-centred: the best intercept for
those weights on F) or refitted by least squares on the kept support (the normal equations restricted to it —
cheap from the same scatter). m is given as fractions of B's channels (1, 2, 5, 10, 25 %, all), at least 1.
Every sparse map is fitted on F and judged on H like the full one.

Both passes are :func:`group_covariances` passes: inside a ``torch.distributed`` process group each rank walks its
share of F and H and the moments are merged over the ranks before any fit (:mod:`mergescope.distributed`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..data import stratified_subset
from ..perm import PermSpec
from .covariance import JointMoments, group_covariances

DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.10, 0.25, 1.0)  # the sparsity sweep: m as a fraction of B's channels
FIT_POINTS = "all"  # a residual stream's fit pools every block output: one map, ranked at each of them
FIT_IMAGES = 5000  # the thesis's fitting subset (000 §3.2.4, A.3: "5000 images … i.e., 5 images per class")
HELDOUT_IMAGES = 5000  # the held-out subset R² is judged on (as many as the fit, at most a fifth of the dataset)
HELDOUT_SHARE = 0.2  # the largest share of the dataset the held-out subset takes


@dataclass
class RegressionFit:
    """One group's regression of A's channels on B's channels (float64 tensors on the statistics' device).

    Attributes:
        weight: (C_A, C_B) map: a ≈ weight @ b + intercept.
        intercept: (C_A,).
        r2: (C_A,) coefficient of determination on the held-out images (:func:`heldout_r2`; NaN for an A channel
            constant on either subset); on the fitting images until :func:`judged` gives it held-out ones.
        m: weights kept per A channel (C_B for the full fit).
        fraction: the requested fraction of C_B (1.0 for the full fit).
        refit: whether the kept weights were refitted on their support.
        label: "all", "10%", "10% refit", …
        r2_fit: (C_A,) R² on the fitting images themselves (in-sample).
        heldout: whether ``r2`` is out of sample.
    """

    weight: torch.Tensor
    intercept: torch.Tensor
    r2: torch.Tensor
    m: int
    fraction: float
    refit: bool
    label: str
    r2_fit: torch.Tensor | None = None
    heldout: bool = False

    def row(self, group: str) -> dict:
        """A JSON-ready summary (R² over the A channels where it is defined)."""
        return {"group": group, "label": self.label, "fraction": self.fraction, "m": self.m, "refit": self.refit,
                "heldout": self.heldout, **_r2_stats(self.r2, "r2"),
                **_r2_stats(self.r2 if self.r2_fit is None else self.r2_fit, "r2_fit"),
                "constant_a": int(torch.isnan(self.r2).sum())}


def _r2_stats(r2: torch.Tensor, key: str) -> dict:
    r = r2[~torch.isnan(r2)].cpu().numpy()
    return {f"mean_{key}": float(r.mean()) if r.size else None, f"median_{key}": float(np.median(r)) if r.size else None}


@dataclass
class RegressionResult:
    """Regression alignment of one model (B) to a reference (A), per group.

    Attributes:
        fits: group -> the full least-squares fit.
        sweep: group -> the sparse fits, by fraction, each without and with refit.
        ridge: the relative ridge λ used.
        samples: samples (images × positions × observation points) each group was fitted on.
        heldout_samples: samples each group's R² was judged on (empty: R² is in-sample).
    """

    fits: dict[str, RegressionFit]
    sweep: dict[str, list[RegressionFit]] = field(default_factory=dict)
    ridge: float = 0.0
    samples: dict[str, int] = field(default_factory=dict)
    heldout_samples: dict[str, int] = field(default_factory=dict)

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


def regression_subsets(dataset, fit_images: int = FIT_IMAGES, heldout_images: int = HELDOUT_IMAGES,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The fitting subset F and the disjoint held-out subset H (ids), both class-stratified
    (:func:`~mergescope.data.stratified_subset`, fixed ``seed``).

    H gets ``heldout_images`` but at most :data:`HELDOUT_SHARE` of the dataset (at least 1 image); F gets
    ``fit_images`` from the rest, so on a large dataset F is exactly D′ of the same size and seed (the thesis's
    5,000 images) and H another 5,000 images; on the digits' 1,437 training images F = 1,150 and H = 287.

    Raises:
        ValueError: a size below 1, or a dataset of fewer than 2 images.
    """
    if fit_images < 1 or heldout_images < 1:
        raise ValueError(f"fit_images and heldout_images must be at least 1, got {fit_images} and {heldout_images}")
    n = len(dataset.targets)
    if n < 2:
        raise ValueError(f"regression needs at least 2 images (one to fit, one held out), the dataset has {n}")
    held = min(heldout_images, max(1, int(HELDOUT_SHARE * n)))
    fit = stratified_subset(dataset.targets, min(fit_images, n - held), seed)
    return fit, stratified_subset(dataset.targets, held, seed, exclude=fit)


Ridge = float | torch.Tensor  # one relative λ, or one per A channel (C_A,)


def _ridge_term(sbb: torch.Tensor, ridge: Ridge) -> float | torch.Tensor:
    """λ·mean(diag S_BB): the ridge in the scatter's units (a tensor λ: one per A channel)."""
    if isinstance(ridge, torch.Tensor):
        return ridge.to(sbb) * float(sbb.diagonal().mean())
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


def _constant_a(stats: JointMoments) -> torch.Tensor:
    sst = stats.saa.diagonal()
    return sst <= 1e-12 * sst.amax().clamp_min(1e-300)


def _r2(stats: JointMoments, weight: torch.Tensor, intercept: torch.Tensor | None = None) -> torch.Tensor:
    """R² per A channel of ``a ≈ weight @ b + intercept`` on the samples of ``stats``, from their moments (no
    samples needed; None: the best intercept for them). NaN where A's channel is constant on them."""
    sst = stats.saa.diagonal()  # (C_A,)
    sse = sst - 2 * (weight * stats.sab).sum(1) + ((weight @ stats.sbb) * weight).sum(1)
    if intercept is not None:
        sse = sse + stats.n * (stats.mean_a - weight @ stats.mean_b - intercept) ** 2
    return torch.where(_constant_a(stats), torch.full_like(sst, math.nan), 1 - sse.clamp_min(0) / sst.clamp_min(1e-300))


def heldout_r2(heldout: JointMoments, fit: RegressionFit, fitted: JointMoments | None = None) -> torch.Tensor:
    """Out-of-sample R² of ``fit`` (weights and intercept as fitted) on the held-out samples' moments; NaN where
    A's channel is constant on the held-out samples, or on the fitting samples ``fitted`` (the fit gave it none).
    """
    r2 = _r2(heldout, fit.weight, fit.intercept)
    if fitted is not None:
        r2 = torch.where(_constant_a(fitted), torch.full_like(r2, math.nan), r2)
    return r2


def judged(fit: RegressionFit, heldout: JointMoments, fitted: JointMoments) -> RegressionFit:
    """``fit`` with its R² judged on the held-out samples (:func:`heldout_r2`) and the in-sample R² as ``r2_fit``."""
    return dataclasses.replace(fit, r2=heldout_r2(heldout, fit, fitted), r2_fit=fit.r2, heldout=True)


def _label(fraction: float, refit: bool) -> str:
    base = "all" if fraction >= 1 else f"{fraction * 100:g}%"
    return base + (" refit" if refit else "")


def _intercept(stats: JointMoments, weight: torch.Tensor) -> torch.Tensor:
    return stats.mean_a - weight @ stats.mean_b


def regression_fit(stats: JointMoments, ridge: Ridge = 0.0) -> RegressionFit:
    """The full least-squares map of A's channels on B's (see the module docstring).

    Args:
        stats: joint statistics with a = A's features, b = B's (:func:`group_covariances`).
        ridge: relative ridge λ ≥ 0 (0: ordinary least squares, pseudo-inverse where singular), or a (C_A,)
            tensor: row i solved with its own λ_i.
    """
    sbb, sab = stats.sbb, stats.sab  # (C_B, C_B), (C_A, C_B)
    lam = _ridge_term(sbb, ridge)
    if isinstance(lam, torch.Tensor):  # W_i = S_ab,i (S_bb + λ_i I)⁻¹ for every row, from one eigendecomposition
        e, v = torch.linalg.eigh(sbb)
        denom = e + lam.unsqueeze(1)  # (C_A, C_B)
        inv = torch.where(denom > 1e-12 * e.amax().clamp_min(1e-300), 1.0 / denom.clamp_min(1e-300),
                          torch.zeros_like(denom))
        weight = ((sab @ v) * inv) @ v.T
    else:
        weight = sab @ psd_pinv(sbb + lam * torch.eye(len(sbb), dtype=sbb.dtype, device=sbb.device))  # symmetric
    return RegressionFit(weight, _intercept(stats, weight), _r2(stats, weight), len(sbb), 1.0, False, "all")


def keep_count(fraction: float, channels: int) -> int:
    """Weights kept for a fraction of ``channels``: round half up, at least 1, at most all."""
    return int(min(channels, max(1, math.floor(fraction * channels + 0.5))))


def sparsify(stats: JointMoments, fit: RegressionFit, fraction: float, refit: bool, ridge: Ridge = 0.0,
             rank_by: str = "weight") -> RegressionFit:
    """Keep the top-m weights per A channel of ``fit`` (m = :func:`keep_count`), refitted on the support or not.

    Args:
        stats: the statistics ``fit`` came from.
        fit: the full fit whose weights are ranked.
        fraction: m as a fraction of B's channels (1.0 keeps all).
        refit: solve the normal equations restricted to the kept support (with the same ridge, scalar or per row).
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
            lam = _ridge_term(sbb, ridge)
            lam = lam.view(-1, 1, 1) if isinstance(lam, torch.Tensor) else lam
            g = g + lam * torch.eye(m, dtype=g.dtype, device=g.device)
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
    heldout_batches: Iterable | None = None,
) -> list[RegressionResult]:
    """Regression alignment of every model in ``others`` onto ``reference``: one pass over the fitting data and
    one over the held-out data.

    Args:
        reference: model A, whose channels are explained.
        others: the models B whose channels explain them.
        spec: the permutation spec (groups and their observation points).
        batches: the fitting data F, e.g. ``iter_batches(ds, 256, ids=fit)`` with ``fit, held =
            regression_subsets(ds)``.
        ridge: relative ridge λ (see the module docstring).
        fractions: the sparsity sweep (None: only the full fit).
        rank_by: how the sweep ranks weights ("weight" or "contribution").
        heldout_batches: the held-out data H that R² is judged on (None: R² on F itself, in-sample).

    Returns:
        One :class:`RegressionResult` per model in ``others``.

    Example:
        >>> fit, held = regression_subsets(train)
        >>> [res] = regress_many(model_a, [model_b], spec, iter_batches(train, 256, ids=fit),
        ...                      heldout_batches=iter_batches(train, 256, ids=held))
        >>> res.fits["features.0"].r2.nanmean()  # held-out R²
    """
    all_stats = group_covariances(reference, others, spec, batches, device=device, progress=progress, total=total,
                                  points=FIT_POINTS)
    held = ([None] * len(others) if heldout_batches is None else
            group_covariances(reference, others, spec, heldout_batches, device=device, progress=progress,
                              points=FIT_POINTS))
    return [regression_from_stats(st, ridge, fractions, rank_by, h) for st, h in zip(all_stats, held)]


def regression_from_stats(stats: dict[str, JointMoments], ridge: float = 0.0,
                          fractions: Sequence[float] | None = DEFAULT_FRACTIONS,
                          rank_by: str = "weight",
                          heldout: dict[str, JointMoments] | None = None) -> RegressionResult:
    """The regression alignment (full fits and sparsity sweep) from already collected group statistics of the
    fitting images (``stats``) and, to judge R² out of sample, of the held-out images (``heldout``)."""
    fits, sweep = {}, {}
    for g, st in stats.items():
        fits[g] = regression_fit(st, ridge)
        if fractions:
            sweep[g] = sparsity_sweep(st, fits[g], fractions, ridge, rank_by)
    result = RegressionResult(fits, sweep, ridge, {g: st.n for g, st in stats.items()})
    return result if heldout is None else judged_result(result, stats, heldout)


def judged_result(result: RegressionResult, stats: dict[str, JointMoments],
                  heldout: dict[str, JointMoments]) -> RegressionResult:
    """Every fit of ``result`` (fitted on ``stats``) with its R² judged on the held-out statistics (:func:`judged`)."""
    return dataclasses.replace(
        result, fits={g: judged(f, heldout[g], stats[g]) for g, f in result.fits.items()},
        sweep={g: [judged(f, heldout[g], stats[g]) for f in fs] for g, fs in result.sweep.items()},
        heldout_samples={g: h.n for g, h in heldout.items()})


def regression_alignment(model_a: nn.Module, model_b: nn.Module, spec: PermSpec, batches: Iterable,
                         **kw) -> RegressionResult:
    """Regression alignment of ``model_b`` onto ``model_a`` (see :func:`regress_many`)."""
    return regress_many(model_a, [model_b], spec, batches, **kw)[0]
