"""Reading state-dict files and loading them into a model, with one-line errors for anything that doesn't fit.

A state dict may come from any training script: safetensors or ``torch.save`` (read with ``weights_only=True``,
so a file cannot run code), bare or nested under ``"state_dict"``, with keys prefixed by the wrapper it was
saved from (``module.`` from DistributedDataParallel / DataParallel, ``_orig_mod.`` from ``torch.compile``).
Builder arguments that only set a shape (``num_classes``, input channels) can be read off the tensors.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from mergescope.errors import CheckpointError
from mergescope.models._registry import get_model_entry, model_config

SAFETENSORS_SUFFIXES = (".safetensors", ".st")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Keys under which training scripts commonly nest the state dict in a torch.save'd file.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
# Key prefixes added by wrappers around the model: DistributedDataParallel / DataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 3  # keys named per kind of mismatch


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
        Name -> tensor (a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is unwrapped, and a wrapper's key
        prefix is stripped, see :func:`strip_wrapper_prefix`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix.lower() in TORCH_SUFFIXES:
        return strip_wrapper_prefix(_read_torch_file(path, device))
    return strip_wrapper_prefix(read_safetensors(path, device))


def strip_wrapper_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without a ``module.`` / ``_orig_mod.`` prefix that *every* key carries (repeatedly, if nested)."""
    state = dict(state)
    while state:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _weight_key(state: Mapping[str, torch.Tensor], ndim: int, axis: int, size: int, last: bool) -> str | None:
    """The last (or first) ``*weight`` tensor of ``ndim`` dims whose ``axis`` has ``size`` entries."""
    keys = [k for k, v in state.items() if k.endswith("weight") and v.ndim == ndim and v.shape[axis] == size]
    return (keys[-1] if last else keys[0]) if keys else None


def infer_shape_kwargs(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``num_classes`` and the input-channel argument as ``state``'s tensors have them.

    ``model`` is the architecture built with its default shape arguments. Its classifier is the last 2-D weight
    whose first dim is its ``num_classes`` (``fc.weight``, ``classifier.6.weight``), its stem the first 4-D
    weight whose second dim is its input channels; ``state``'s tensors under those keys give the values.

    Args:
        model: built by :func:`mergescope.models.create_model`.
        state: the tensors to fit.

    Returns:
        The arguments found (a key absent from ``state``, or of another rank, gives nothing).
    """
    arch = model_config(model)
    kwargs, channels_arg = arch["kwargs"], get_model_entry(arch["name"]).channels_arg
    own = model.state_dict()
    where = {"num_classes": (2, 0, True), channels_arg: (4, 1, False)}  # ndim, axis, last
    found = {}
    for arg, (ndim, axis, last) in where.items():
        if not isinstance(kwargs.get(arg), int):
            continue
        key = _weight_key(own, ndim, axis, kwargs[arg], last)
        if key is not None and key in state and state[key].ndim == ndim:
            found[arg] = int(state[key].shape[axis])
    return found


def _first(keys: list[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:_SHOWN])
    return shown + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str) -> None:
    """Raise CheckpointError naming the first few missing, unexpected and mis-shaped tensors, with counts.

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
    misshaped = [k for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing tensor {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor {_first(unexpected)}")
    for key in misshaped[:_SHOWN]:
        problems.append(f"tensor '{key}' has shape {tuple(state[key].shape)} in the checkpoint "
                        f"but {tuple(expected[key].shape)} in the model")
    if len(misshaped) > _SHOWN:
        problems.append(f"+{len(misshaped) - _SHOWN} more mis-shaped")
    if problems:
        counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped"
        raise CheckpointError(f"{source} does not fit architecture '{arch}' ({counts}): {'; '.join(problems)}")


def apply_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str | None = None) -> None:
    """Check ``state`` against ``model`` (see :func:`check_state_dict`) and load it strictly, in place."""
    arch_name = arch or getattr(model, "mergescope_arch", {}).get("name", type(model).__name__)
    check_state_dict(model, state, source, arch_name)
    model.load_state_dict(state, strict=True)
