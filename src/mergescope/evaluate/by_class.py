"""Per-class loss and accuracy of many models in one pass, and the accuracy on a subset of the classes — ZipIt!'s
per-task accuracy (Stoica et al. 2024, Table 1: a model merged from a "classes 0-4" and a "classes 5-9"
model is scored on all test images — joint — and on the test images of each half's classes, over all ten logits).

The subset's accuracy is Σ_{c∈S} correct_c / Σ_{c∈S} n_c: the images of those classes only (their predictions still
range over every class); the joint accuracy is the same sum over all classes.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce, shard
from ..errors import NumericsError
from ..probe.engine import run_pass


def class_sums(models: Mapping[str, nn.Module], batches: Iterable, num_classes: int,
               device: torch.device | str = "cpu", progress: bool = False, total: int | None = None,
               desc: str = "evaluating") -> dict[str, torch.Tensor]:
    """Per model, float64 [3, K]: per true class its summed cross-entropy, correct predictions and images — every
    model on the same batches, one pass (summed over the ranks of a process group)."""
    sums = {k: torch.zeros(3, num_classes, dtype=torch.float64) for k in models}
    for m in models.values():
        m.to(device).eval()

    def consume(batch, x, outs):
        y = batch.y.to(device)
        for name, logits in outs.items():
            if not torch.isfinite(logits).all():
                raise NumericsError(f"model '{name}' produced NaN/Inf outputs")
            loss = F.cross_entropy(logits.float(), y, reduction="none").double().cpu()
            hit = (logits.argmax(1) == y).double().cpu()
            yc = y.cpu()
            for row, values in enumerate((loss, hit, torch.ones_like(hit))):
                sums[name][row].index_add_(0, yc, values)

    batches, total = shard(batches, total)
    run_pass(models, batches, consume, device=device, desc=desc, total=total, progress=progress)
    if sums:
        sums = dict(zip(sums, all_reduce(torch.stack(list(sums.values()))).unbind()))
    return sums


def subset_scores(sums: torch.Tensor, classes: Sequence[int] | None = None) -> dict[str, float]:
    """``{"loss", "accuracy", "images"}`` on the images of ``classes`` (None: all) from :func:`class_sums`' [3, K]."""
    keep = sums if classes is None else sums[:, list(classes)]
    loss, correct, count = keep.sum(dim=1).tolist()
    if count == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "images": 0}
    return {"loss": loss / count, "accuracy": correct / count, "images": int(count)}
