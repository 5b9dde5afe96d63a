"""Top-k overlap: the share of channel c's top-k images in model A that are also among its top-k in model B."""
from __future__ import annotations

import torch

from ..errors import MergescopeError


def _check_ids(ids_a: torch.Tensor, ids_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids_a, ids_b = torch.as_tensor(ids_a), torch.as_tensor(ids_b)
    if ids_a.ndim != 2 or ids_a.shape[0] != ids_b.shape[0] or ids_b.ndim != 2:
        raise MergescopeError(f"top-k id sets must be [C, k] with the same C; got {tuple(ids_a.shape)} and "
                              f"{tuple(ids_b.shape)}")
    if ids_a.is_floating_point() or ids_b.is_floating_point():
        raise MergescopeError("top-k ids must be integers (image ids, -1 = padding)")
    return ids_a.long(), ids_b.to(ids_a.device).long()


def first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """bool [C, k]: True at each valid id (≥ 0) not already seen earlier in its row, so a row acts as a set."""
    ids = torch.as_tensor(ids)
    k = ids.shape[1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)  # [i, i'] = i' < i
    dup = ((ids[:, :, None] == ids[:, None, :]) & earlier).any(2)  # [C,k]
    return (ids >= 0) & ~dup


def member(ids: torch.Tensor, of: torch.Tensor) -> torch.Tensor:
    """bool [C, k]: ``ids[c, i]`` is a valid id that occurs among the valid ids of ``of[c]``."""
    ids, of = _check_ids(ids, of)
    hit = (ids[:, :, None] == of[:, None, :]) & (of[:, None, :] >= 0)  # [C,k,k']
    return hit.any(2) & (ids >= 0)


def overlap_counts(ids_a: torch.Tensor, ids_b: torch.Tensor) -> torch.Tensor:
    """int64 [C]: |T_A(c) ∩ T_B(c)|, the number of distinct image ids in both rows; -1 entries are padding."""
    ids_a, ids_b = _check_ids(ids_a, ids_b)
    return (member(ids_a, ids_b) & first_occurrence(ids_a)).sum(1)


def topk_overlap(ids_a: torch.Tensor, ids_b: torch.Tensor) -> torch.Tensor:
    """Top-k overlap per channel: |T_A(c) ∩ T_B(c)| / k, by image id.

    Args:
        ids_a, ids_b: int [C, k] top-k image ids of channel c in model A and in (aligned) model B, e.g.
            ``LayerProbe.topk_ids``. -1 is padding: it matches nothing. Duplicate ids in a row count once.

    Returns:
        float64 [C] in [0, 1]; k is the row width of ``ids_a`` (the k asked for), so a padded slot counts as a
        miss. 1.0 means the same k images.

    Example:
        >>> topk_overlap(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[4, 9, 1, -1]])).tolist()
        [0.5]
    """
    ids_a, ids_b = _check_ids(ids_a, ids_b)
    k = ids_a.shape[1]
    if k == 0:
        raise MergescopeError("top-k overlap needs k >= 1")
    return overlap_counts(ids_a, ids_b).double() / k
