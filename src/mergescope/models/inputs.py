"""Whether a model accepts a dataset's images, checked on one image before any pass."""
from __future__ import annotations

import torch
from torch import nn

from mergescope.errors import ArchitectureError


def check_input_fits(model: nn.Module, dataset, what: str = "the model") -> None:
    """Run the dataset's first image through ``model`` (eval mode, no grad; its mode is restored); a model that
    cannot take it (e.g. a classifier sized for another resolution) raises a one-line ArchitectureError naming
    the image shape, instead of a shape error deep inside a pass.

    Args:
        model: the network, on its device.
        dataset: a mergescope dataset (``get_batch``).
        what: how the error names the model, e.g. "checkpoint a.safetensors".
    """
    x, _ = dataset.get_batch([0])
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    except RuntimeError as e:
        shape = "×".join(str(d) for d in x.shape[1:])
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArchitectureError(f"{what} does not accept the data's {shape} images ({reason})") from None
    finally:
        model.train(training)
