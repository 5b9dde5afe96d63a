"""Reading state-dict files and loading them into a model, with one-line errors for anything that doesn't fit."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from mergescope.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".st")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Keys under which training scripts commonly nest the state dict in a torch.save'd file.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")


def read_safetensors(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file; any unreadable file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(path, device=str(device))
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None


def _read_torch_file(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load {path} with torch.load(weights_only=True): {first_line}") from None
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        obj = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: entry '{bad}' is a {type(obj[bad]).__name__}, not a tensor")
    return dict(obj)


def load_state_dict_file(path: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file, or a ``.pt/.pth/.bin`` file via ``torch.load(weights_only=True)``.

    Args:
        path: the file; ``.pt/.pth/.bin`` go through torch.load, everything else through safetensors.
        device: where to put the tensors.

    Returns:
        Name -> tensor (a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is unwrapped).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix.lower() in TORCH_SUFFIXES:
        return _read_torch_file(path, device)
    return read_safetensors(path, device)


def _more(keys: list[str]) -> str:
    return f"'{keys[0]}'" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor.

    Args:
        model: the model the tensors should fit.
        state: name -> tensor.
        source: where the tensors came from (for the message).
        arch: the architecture's name (for the message).
    """
    expected = model.state_dict()
    # BatchNorm fills in a missing num_batches_tracked itself; torch tolerates its absence, so do we.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing tensor {_more(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor {_more(unexpected)}")
    if problems:
        raise CheckpointError(f"{source} does not fit architecture '{arch}': {'; '.join(problems)}")
    for key, want in expected.items():
        if key in state and tuple(state[key].shape) != tuple(want.shape):
            raise CheckpointError(
                f"{source} does not fit architecture '{arch}': tensor '{key}' has shape "
                f"{tuple(state[key].shape)} in the checkpoint but {tuple(want.shape)} in the model"
            )


def apply_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str | None = None) -> None:
    """Check ``state`` against ``model`` (see :func:`check_state_dict`) and load it strictly, in place."""
    arch_name = arch or getattr(model, "mergescope_arch", {}).get("name", type(model).__name__)
    check_state_dict(model, state, source, arch_name)
    model.load_state_dict(state, strict=True)
