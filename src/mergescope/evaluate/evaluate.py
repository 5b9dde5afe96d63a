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
    # per model, on the device (no per-batch synchronisation): loss sum, correct, and the float64 sum of all
    # logits, whose finiteness says whether any logit was NaN/Inf (checked once, at the end); then the count
    sums = {k: torch.zeros(3, dtype=torch.float64, device=device) for k in models}
    seen = [0]
    for m in models.values():
        m.to(device).eval()

    def consume(batch, x, outs):
        y = batch.y.to(device, non_blocking=True)
        seen[0] += len(y)
        for name, logits in outs.items():
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            correct = (logits.argmax(1) == y).sum()
            sums[name] += torch.stack([loss.double(), correct.double(), logits.sum(dtype=torch.float64)])

    batches, total = shard(batches, total)
    run_pass(models, batches, consume, device=device, desc=desc, total=total, progress=progress)
    if sums:  # (models, 4), summed over the ranks
        local = torch.stack([torch.cat([v.cpu(), torch.tensor([float(seen[0])], dtype=torch.float64)])
                             for v in sums.values()])
        sums = dict(zip(sums, all_reduce(local).unbind()))
    for name, s in sums.items():
        if not torch.isfinite(s[2]):
            raise NumericsError(f"model '{name}' produced NaN/Inf outputs")
    return {k: {"loss": float(s[0] / s[3]), "accuracy": float(s[1] / s[3])} for k, s in sums.items()}
