"""Regression merging (the thesis's proposal, 000 §4.2): the (sparse) regression map used as the alignment.

Per group, T = the least-squares map of A's channels on B's (:mod:`mergescope.align.regression`), optionally
sparsified to the top-m weights per A channel and refitted on that support; B's weights are rewritten with T on
their output axes and merged with A. For the input axes (the next layer), either

* ``inverse="pinv"``: the pseudo-inverse of T, or
* ``inverse="regression"``: the regression the other way, B's channels on A's (same ridge and sparsity) —
  the best linear estimate of B's features from A's, which a sparse, non-invertible T has no inverse for.

Intercepts are not used (they live after the nonlinearity; REPAIR/RESET restore channel means). For a permuted
copy T is the permutation (up to rounding), and so is either inverse.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..align.covariance import JointMoments
from ..align.regression import RegressionFit, regression_fit, sparsify
from ..perm import PermSpec
from .maps import (
    ChannelMap,
    MapLayout,
    MapMergeResult,
    MethodInfo,
    merge_many_by_stats,
    per_group,
)

INFO = MethodInfo(
    name="regression",
    needs_extra_layers=False,
    exact_for_permuted_copies=True,
    notes="T is the least-squares map of A's features on B's, fitted after the nonlinearity and applied to the "
          "weights: an approximation after each ReLU (exact at pre-activations); sparse T (m < all) is usually "
          "not invertible, hence inverse='regression' (B on A) or the pseudo-inverse; BatchNorm refolded.",
)


def _fit(stats: JointMoments, fraction: float, refit: bool, ridge: float) -> RegressionFit:
    full = regression_fit(stats, ridge)
    return full if fraction >= 1 else sparsify(stats, full, fraction, refit, ridge)


def regression_map(stats: JointMoments, fraction: float = 1.0, refit: bool = True, ridge: float = 0.0,
                   inverse: str = "regression") -> tuple[ChannelMap, RegressionFit]:
    """The regression map of B's channels into A's space for one group, and the fit it came from.

    Args:
        stats: joint statistics with a = A's features, b = B's.
        fraction: keep the top ``fraction`` of weights per A channel (1.0: all).
        refit: refit the kept weights on their support.
        ridge: relative ridge λ.
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
                    ridge: float = 0.0, inverse: str = "regression"
                    ) -> tuple[dict[str, ChannelMap], dict[str, RegressionFit]]:
    """:func:`regression_map` for every group; returns (maps, {group: fit})."""
    return per_group(lambda st: regression_map(st, fraction, refit, ridge, inverse), stats)


def regression_merge_many(
    reference: nn.Module,
    others: Sequence[nn.Module],
    batches: Iterable,
    spec: PermSpec | None = None,
    weights: Sequence[float] | None = None,
    fraction: float = 1.0,
    refit: bool = True,
    ridge: float = 0.0,
    inverse: str = "regression",
    layout: MapLayout | None = None,
    stats: Sequence[Mapping[str, JointMoments]] | None = None,
    device: torch.device | str = "cpu",
) -> MapMergeResult:
    """Map every model of ``others`` into the reference's space by regression and average all of them.

    Args: as :func:`mergescope.merge.cca.cca_merge_many`, with ``fraction``, ``refit``, ``ridge`` and
        ``inverse`` of :func:`regression_map`. The fitting data is usually the fixed subset
        (``iter_batches(ds, 50, ids=regression_subset(ds))``).

    Returns:
        :class:`MapMergeResult` with extras {"fits": [per model {group: RegressionFit}]}.
    """
    return merge_many_by_stats(reference, others, batches, lambda st: regression_maps(st, fraction, refit, ridge, inverse), INFO, "fits", spec,
                               weights, layout, stats, device)
