"""The one data pass: every batch is loaded once and fed to every model; consumers see all outputs at once."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from .._allocator import keep_freed_memory
from .._progress import track
from ..timing import stage

_END = object()  # the end of the batches
Consumer = Callable[[Any, torch.Tensor, dict[str, Any]], None]  # (batch, x on device, {model: output})


def run_pass(
    models: Mapping[str, nn.Module],
    batches: Iterable[Any],
    consume: Consumer,
    device: torch.device | str = "cpu",
    desc: str = "data pass",
    total: int | None = None,
    progress: bool = False,
    autocast: torch.dtype | None = None,
) -> int:
    """Feed each batch (anything with ``.x``) to every model and hand all outputs to ``consume``.

    Models run under ``torch.inference_mode`` in whatever train/eval mode they are in (RESET relies on that),
    and under ``torch.autocast`` to ``autocast`` (e.g. ``torch.bfloat16``) when it is given;
    freed activation memory is kept for the next batch (:func:`mergescope._allocator.keep_freed_memory`).
    The time goes to the stages ``decode`` (waiting for the batch), ``transfer``, ``forward`` and ``statistics``
    (``consume``) of :mod:`mergescope.timing`.

    Returns:
        The number of batches seen.
    """
    keep_freed_memory()
    seen = 0
    device = torch.device(device)
    sync = device if device.type == "cuda" else None
    cast = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast is not None else nullcontext
    items = iter(track(batches, total=total, desc=desc, enabled=progress))
    with torch.inference_mode():
        while True:
            with stage("decode"):
                batch = next(items, _END)
            if batch is _END:
                break
            with stage("transfer", sync):
                x = batch.x.to(device, non_blocking=True)
            with stage("forward", sync), cast():
                outputs = {name: model(x) for name, model in models.items()}
            with stage("statistics", sync):
                consume(batch, x, outputs)
            seen += 1
    return seen
