"""Every channel metric between channel j of one probed model and channel p of another, for any list of (j, p).

The matched pairs (p = j) give the values of ``compare.csv``; the unmatched ones (p ≠ j) the null of
:mod:`.null`. One function, so the null is the same metric as the value it judges.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..errors import MergescopeError
from .clip_delta import clip_delta_pairs_from_ids
from .kendall import kendall_tau_b
from .overlap import overlap_counts

METRICS = {"kendall_tau": True, "clip_delta": False, "overlap": True, "correlation": True}  # name -> higher = similar


def pair_values(metric: str, x, y, rows: torch.Tensor, cols: torch.Tensor, *,
                embed: Callable[[torch.Tensor], torch.Tensor] | None = None, delta_variant: str = "thesis",
                correlation: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The metric between channel ``rows[i]`` of ``x`` and channel ``cols[i]`` of ``y`` (two ``LayerProbe`` s).

    Args:
        metric: one of :data:`METRICS`: ``kendall_tau`` (τ-b on D′, needs both ``subset`` s), ``clip_delta``
            (δ of :func:`~mergescope.compare.clip_delta_pairs`, x's self-similarity and denominator; needs
            ``embed``), ``overlap`` (|T_x ∩ T_y| / k) or ``correlation`` (``correlation[j, p]``, x's channel ×
            y's channel in y's aligned order; needs the matrix).
        rows, cols: int64 [P] channel indices.
        embed, delta_variant: the image embedding lookup and the CLIP-δ variant.

    Returns:
        (float64 [P] values, 0.0 where undefined; bool [P] defined; bool [P] dead: either channel constant over
        the dataset), or None where the metric's inputs are missing (no D′ activations, no embedder, no
        correlation matrix).
    """
    rows, cols = torch.as_tensor(rows).long(), torch.as_tensor(cols).long()
    dead = ((x.std == 0)[rows] | (y.std == 0)[cols]).cpu().numpy()
    if metric == "kendall_tau":
        if x.subset is None or y.subset is None:
            return None
        r = kendall_tau_b(x.subset[:, rows], y.subset[:, cols])
        values, defined = r.tau.cpu().numpy(), r.defined.cpu().numpy()
    elif metric == "clip_delta":
        if embed is None:
            return None
        d = clip_delta_pairs_from_ids(x.topk_ids, y.topk_ids, embed, variant=delta_variant)
        values, defined = d.delta[rows, cols].cpu().numpy(), d.defined[rows, cols].cpu().numpy()
    elif metric == "overlap":
        k = x.topk_ids.shape[1]
        values = (overlap_counts(x.topk_ids[rows], y.topk_ids[cols]).double() / k).cpu().numpy()
        defined = np.ones(len(rows), bool)
    elif metric == "correlation":
        if correlation is None:
            return None
        values = np.asarray(correlation, dtype=np.float64)[rows.numpy(), cols.numpy()]
        defined = np.isfinite(values)
        values = np.where(defined, values, 0.0)
    else:
        raise MergescopeError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return values.astype(np.float64), defined.astype(bool), dead
