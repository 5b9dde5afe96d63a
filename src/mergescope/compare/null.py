"""When is a channel pair "similar"? Beyond a quantile of the metric's null in the same layer (DESIGN "Similar").

The thesis (000 §3.2.2–3.2.3, Observations 1–3) judged similarity by eye. Here a metric m(j, p) between channel j
of model X and channel p of model Y (Y aligned to X, so p = j is the matched pair) is judged against its *null*:
the same metric between X's channel j and the channels p ≠ j of Y that j was **not** matched to, in the same layer.

* Partners: for every channel j, a fixed sample of ``partners`` unmatched channels p ≠ j, drawn without
  replacement with a ``torch.Generator`` seeded with ``seed`` (:func:`unmatched_partners`); all C − 1 of them when
  C − 1 ≤ ``partners``. The same sample serves every metric of the layer.
* Pool: m(j, p) over all those (j, p) where the metric is defined and neither channel is dead.
* Threshold: ``numpy.quantile(pool, q)`` (linear interpolation) where higher is similar (Kendall τ, top-k
  overlap, correlation); ``numpy.quantile(pool, 1 − q)`` where lower is similar (CLIP-δ). Default q = 0.95.
* Similar: strictly beyond the threshold (``>`` resp. ``<``). Strict, so that a discrete metric whose null is
  mostly one value (top-k overlap: 0) needs a value beyond it. Under the null, about 1 − q of pairs are similar.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MergescopeError

DEFAULT_QUANTILE = 0.95
DEFAULT_PARTNERS = 32


def unmatched_partners(channels: int, partners: int = DEFAULT_PARTNERS, seed: int = 0) -> torch.Tensor:
    """int64 [C, m]: for each channel j, m = min(partners, C − 1) distinct channels p ≠ j (see the module docstring).

    Example:
        >>> unmatched_partners(3, 5).tolist()
        [[1, 2], [0, 2], [0, 1]]
    """
    if partners < 1:
        raise MergescopeError(f"null partners must be >= 1, got {partners}")
    m = min(partners, channels - 1)
    j = torch.arange(channels)[:, None]
    if m == channels - 1:
        idx = torch.arange(channels - 1).expand(channels, -1)
    else:
        g = torch.Generator().manual_seed(seed)
        idx = torch.rand(channels, channels - 1, generator=g).argsort(1)[:, :m]  # uniform m-subset of C − 1
    return idx + (idx >= j).long()  # skip j itself: [0, C−2] -> the channels other than j


@dataclass(frozen=True)
class NullThreshold:
    """The null of one metric in one layer and the threshold it gives (JSON-ready via :meth:`to_dict`)."""

    metric: str
    quantile: float  # q
    higher_is_similar: bool
    threshold: float | None  # None: the pool was empty, nothing can be judged
    size: int  # pairs in the pool
    partners: int  # unmatched partners per channel

    def similar(self, values: np.ndarray, usable: np.ndarray) -> list[bool | None]:
        """Per value: True beyond the threshold, False otherwise, None where unusable or no threshold."""
        if self.threshold is None:
            return [None] * len(values)
        beyond = values > self.threshold if self.higher_is_similar else values < self.threshold
        return [bool(b) if ok else None for b, ok in zip(beyond, usable)]

    def to_dict(self) -> dict:
        return {"metric": self.metric, "quantile": self.quantile, "higher_is_similar": self.higher_is_similar,
                "threshold": self.threshold, "size": self.size, "partners": self.partners}


def null_threshold(metric: str, values: np.ndarray, usable: np.ndarray, *, higher_is_similar: bool,
                   quantile: float = DEFAULT_QUANTILE, partners: int = DEFAULT_PARTNERS) -> NullThreshold:
    """The threshold of a null pool: its q-quantile (higher is similar) or (1 − q)-quantile (lower is similar).

    Args:
        metric: the metric's name (recorded).
        values, usable: the metric over the unmatched pairs, and which of them enter the pool.
        higher_is_similar: the metric's direction.
        quantile: q in (0, 1).
        partners: unmatched partners per channel (recorded).
    """
    check_quantile(quantile)
    pool = np.asarray(values, dtype=np.float64)[np.asarray(usable, dtype=bool)]
    q = quantile if higher_is_similar else 1.0 - quantile
    threshold = float(np.quantile(pool, q)) if pool.size else None
    return NullThreshold(metric, quantile, higher_is_similar, threshold, int(pool.size), partners)


def check_quantile(quantile: float) -> None:
    if not 0.0 < quantile < 1.0:
        raise MergescopeError(f"null quantile must be between 0 and 1 (exclusive), got {quantile}")


__all__ = ["DEFAULT_PARTNERS", "DEFAULT_QUANTILE", "NullThreshold", "check_quantile", "null_threshold",
           "unmatched_partners"]
