"""A plain loss/accuracy pass over a dataset (the full evaluation harness lives in mergescope.evaluate); sharded
over the ranks of a ``torch.distributed`` process group like every pass (:mod:`mergescope.distributed`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mergescope.data import iter_batches
from mergescope.distributed import all_reduce, shard
from mergescope.errors import DatasetError


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    ds,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    ids: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``ds`` (eval mode; the model's mode is restored).

    Args:
        model: classifier, already on ``device``.
        ds: a mergescope dataset.
        batch_size: examples per forward pass.
        device: where the batches go.
        ids: evaluate on these example ids only (default: all).

    Returns:
        ``(loss, accuracy)`` with accuracy in [0, 1].
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64)
    batches, _ = shard(iter_batches(ds, batch_size, ids=ids))
    try:
        for batch in batches:
            x, y = batch.x.to(device), batch.y.to(device)  # [B, C, H, W], [B]
            logits = model(x).float()  # [B, classes]
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
            count += len(y)
    finally:
        model.train(was_training)
    loss_sum, correct, count = all_reduce(loss_sum), all_reduce(correct), int(all_reduce(count))
    if count == 0:
        raise DatasetError("cannot evaluate on an empty dataset")
    return float(loss_sum) / count, int(correct) / count
