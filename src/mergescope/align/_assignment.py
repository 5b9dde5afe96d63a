"""The linear assignment step shared by every matching method."""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import NumericsError


def best_permutation(similarity: np.ndarray | torch.Tensor, what: str = "similarity",
                     maximize: bool = True) -> torch.Tensor:
    """The permutation ``p`` maximizing ``sum_i similarity[i, p[i]]`` (scipy's Hungarian solver).

    ``maximize=False``: the matrix is a cost and ``p`` minimizes it (a float64 C-order array reaches scipy
    uncopied; maximizing costs scipy a negated copy).
    """
    sim = similarity.detach().cpu().double().numpy() if isinstance(similarity, torch.Tensor) else similarity
    if not np.isfinite(sim).all():
        raise NumericsError(f"{what} matrix contains NaN or Inf; check the model's activations")
    rows, cols = linear_sum_assignment(sim, maximize=maximize)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
