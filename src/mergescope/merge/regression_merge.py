"""Regression merging: the thesis's (sparse) regression map (000 §3.2.4, Observation 4) used as the alignment —
mergescope's construction; the thesis proposes no merge with it (§4.2 only motivates going beyond permutations).

Per group, T = the least-squares map of A's channels on B's (:mod:`mergescope.align.regression`), optionally
sparsified to the top-m weights per A channel and refitted on that support; B's weights are rewritten with T on
their output axes and merged with A. For the input axes (the next layer), either

* ``inverse="pinv"``: the pseudo-inverse of T, or
* ``inverse="regression"``: the regression the other way, B's channels on A's (same ridge and sparsity) —
  the best linear estimate of B's features from A's, which a sparse, non-invertible T has no inverse for.

Intercepts are not used (they live after the nonlinearity; REPAIR/RESET restore channel means). For a permuted
copy T is the permutation (up to rounding), and so is either inverse.

**Ridge scaled by the unexplained variance, by default** (:data:`MERGE_RIDGE`): row i of T is solved with the
relative ridge λ_i = 0.1·(1 − R²_i)·mean(diag Σ_BB), R²_i that of the unregularised fit on the same statistics;
the alignment study (:mod:`mergescope.align.regression`) stays the thesis's plain least squares. Why: T is fitted
on post-ReLU features but applied to B's weights, i.e. to its *pre-activations*. A B channel that rarely fires has
a tiny post-ReLU variance and a large pre-activation one; ordinary least squares uses such channels as cheap extra
dimensions (large weights that barely change the fit), and in the rewritten weights they inject their whole
pre-activation signal into A's channels. Measured on a trained digits CNN without BatchNorm (``cnn_digits``
width 16, seeds 0/1, statistics on the 1,437 training images; last conv): two B channels firing on 0.2 % and
1.2 % of images × positions, post/pre-activation std 0.010/0.85 and 0.012/0.45, get OLS weights 5.2 and 7.9.
T(B) then scores 59 % on the test split (B: 98 %), regression+REPAIR at α = ½ 77.5 % (permuted+REPAIR 95.3 %),
and REPAIR makes it worse, since its targets are the statistics of T applied to B's pre-activations, inflated
too. With the default ridge: T(B) 83 % (86 % with REPAIR), regression+REPAIR at α = ½ 95.8 %; the BatchNorm CNN
is unchanged (97.8 %). The issue's case, ``alexnet_cifar`` (no BatchNorm), width ¼, two models trained 2 epochs
on CIFAR-10 (test 53.2 / 42.4 %), 5,000 statistics images: OLS weights reach 69, 62 and 115 on channels that fire
on under 0.2 % of the samples (post/pre std ~0.001/0.2–1.2); regression+REPAIR is at chance (8.5 % at α = 0,
15.2 % at α = ½; without REPAIR test loss 7,039 at α = 0); with the default ridge max |W| ≤ 0.7 and
regression+REPAIR gives 32.4 % at α = 0 and 44.9 % at α = ½ (permuted+REPAIR 42.7 %, CCA+REPAIR 44.5 %).
MERGE_RIDGE = 0.1 was picked on the digits pair (0.01–1 all within 1 point there). A uniform ridge does as well
(λ = 0.01: 95.0 % on digits) but shrinks exact maps; this one vanishes where the fit is exact (R² = 1), so a
permuted or linearly mixed copy is still recovered exactly.
``ridge=0`` is the unregularised map; a float ``ridge`` a uniform relative ridge — see :func:`merge_ridge`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..align.covariance import JointMoments
from ..align.regression import RegressionFit, regression_fit, sparsify
from .maps import ChannelMap, per_group

MERGE_RIDGE = 0.1  # λ_i = MERGE_RIDGE·(1 − R²_i), relative (module docstring: OLS breaks nets without BatchNorm)


def merge_ridge(stats: JointMoments, scale: float = MERGE_RIDGE) -> torch.Tensor:
    """Per A channel relative ridge λ_i = ``scale``·(1 − R²_i) of the unregularised fit (0 where A's channel is
    constant or the fit exact; module docstring)."""
    r2 = regression_fit(stats).r2
    return scale * (1 - torch.nan_to_num(r2, nan=1.0)).clamp(0, 1)


def _fit(stats: JointMoments, fraction: float, refit: bool, ridge: float | None) -> RegressionFit:
    lam = merge_ridge(stats) if ridge is None else ridge
    full = regression_fit(stats, lam)
    return full if fraction >= 1 else sparsify(stats, full, fraction, refit, lam)


def regression_map(stats: JointMoments, fraction: float = 1.0, refit: bool = True, ridge: float | None = None,
                   inverse: str = "regression") -> tuple[ChannelMap, RegressionFit]:
    """The regression map of B's channels into A's space for one group, and the fit it came from.

    Args:
        stats: joint statistics with a = A's features, b = B's.
        fraction: keep the top ``fraction`` of weights per A channel (1.0: all).
        refit: refit the kept weights on their support.
        ridge: None (default): :func:`merge_ridge` per channel; a float: that uniform relative ridge (0: ordinary
            least squares).
        inverse: "regression" (B on A, same sparsity) or "pinv".
    """
    fit = _fit(stats, fraction, refit, ridge)
    if inverse == "regression":
        inv = _fit(stats.swapped(), fraction, refit, ridge).weight
    elif inverse == "pinv":
        inv = torch.linalg.pinv(fit.weight)
    else:
        raise ValueError(f"inverse must be 'regression' or 'pinv', got {inverse!r}")
    return ChannelMap(fit.weight, inv), fit


def regression_maps(stats: Mapping[str, JointMoments], fraction: float = 1.0, refit: bool = True,
                    ridge: float | None = None, inverse: str = "regression"
                    ) -> tuple[dict[str, ChannelMap], dict[str, RegressionFit]]:
    """:func:`regression_map` for every group; returns (maps, {group: fit})."""
    return per_group(lambda st: regression_map(st, fraction, refit, ridge, inverse), stats)
