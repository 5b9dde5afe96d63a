"""The one data pass: every batch is loaded once and fed to every model; consumers see all outputs at once."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .._progress import track

Consumer = Callable[[Any, torch.Tensor, dict[str, Any]], None]  # (batch, x on device, {model: output})


def run_pass(
    models: Mapping[str, nn.Module],
    batches: Iterable[Any],
    consume: Consumer,
    device: torch.device | str = "cpu",
    desc: str = "data pass",
    total: int | None = None,
    progress: bool = False,
) -> int:
    """Feed each batch (anything with ``.x``) to every model and hand all outputs to ``consume``.

    Models run under ``torch.inference_mode`` in whatever train/eval mode they are in (RESET relies on that).

    Returns:
        The number of batches seen.
    """
    seen = 0
    with torch.inference_mode():
        for batch in track(batches, total=total, desc=desc, enabled=progress):
            x = batch.x.to(device, non_blocking=True)
            consume(batch, x, {name: model(x) for name, model in models.items()})
            seen += 1
    return seen
