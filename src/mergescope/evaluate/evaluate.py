"""Loss and accuracy of many models in one pass over an evaluation set (inside a ``torch.distributed`` process
group: each rank walks its share of the batches and the sums are all-reduced, :mod:`mergescope.distributed`)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce, shard
from ..errors import NumericsError
from ..probe.engine import run_pass


def evaluate_models(
    models: Mapping[str, nn.Module],
    batches: Iterable,
    device: torch.device | str = "cpu",
    progress: bool = False,
    total: int | None = None,
    desc: str = "evaluating",
) -> dict[str, dict[str, float]]:
    """Mean cross-entropy and accuracy (a fraction in [0, 1]) of every model, sharing one pass over the data.

    Returns:
        ``{name: {"loss": float, "accuracy": float}}``. Non-finite logits raise NumericsError naming the model.
    """
    sums = {k: torch.zeros(3, dtype=torch.float64) for k in models}  # loss sum, correct, count
    for m in models.values():
        m.to(device).eval()

    def consume(batch, x, outs):
        y = batch.y.to(device)
        for name, logits in outs.items():
            if not torch.isfinite(logits).all():
                raise NumericsError(f"model '{name}' produced NaN/Inf outputs")
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            correct = (logits.argmax(1) == y).sum()
            sums[name] += torch.tensor([loss.item(), correct.item(), len(y)], dtype=torch.float64)

    batches, total = shard(batches, total)
    run_pass(models, batches, consume, device=device, desc=desc, total=total, progress=progress)
    if sums:  # (models, 3), summed over the ranks
        sums = dict(zip(sums, all_reduce(torch.stack(list(sums.values()))).unbind()))
    return {k: {"loss": float(s[0] / s[2]), "accuracy": float(s[1] / s[2])} for k, s in sums.items()}
