"""Checkpoints: safetensors weights plus a JSON sidecar recording architecture and metadata.

``run/a.safetensors`` holds ``model.state_dict()`` (contiguous CPU tensors); ``run/a.json`` holds::

    {"format": "mergescope-checkpoint", "format_version": 1, "mergescope_version": "0.1.0",
     "arch": {"name": "resnet20", "kwargs": {...}}, "weights": "a.safetensors", "meta": {...}}

Both files are written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mergescope._atomic import atomic_path, atomic_write_text
from mergescope._jsonio import dumps, package_version
from mergescope.errors import CheckpointError
from mergescope.models import apply_state_dict, create_model, load_state_dict_file, model_config, read_safetensors

FORMAT = "mergescope-checkpoint"
FORMAT_VERSION = 1

__all__ = [
    "load_checkpoint",
    "load_state_dict_file",
    "read_checkpoint_info",
    "save_checkpoint",
    "sidecar_path",
]


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar belonging to a weights file (``a.safetensors`` -> ``a.json``)."""
    return Path(path).with_suffix(".json")


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights to ``path`` (safetensors) and its architecture + ``meta`` to the JSON sidecar.

    Args:
        path: weights file, conventionally ``*.safetensors``; the sidecar is ``path.with_suffix(".json")``.
        model: a model built by :func:`mergescope.models.create_model` (so its architecture is known).
        meta: JSON-able metadata (config, seed, metrics, dataset fingerprint, ...); dataclasses, numpy values
            and paths are converted.

    Returns:
        The sidecar's path.
    """
    path = Path(path)
    side = sidecar_path(path)
    if side == path:
        raise CheckpointError(f"checkpoint path {path} ends in .json, which is reserved for its sidecar")
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mergescope_version": package_version(),
        "arch": model_config(model),
        "weights": path.name,
        "meta": meta or {},
    }
    try:
        text = dumps(record)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata for {path} is not JSON-serialisable: {exc}") from None
    # Copies, so tied/shared parameters don't trip safetensors' shared-memory check.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    atomic_write_text(side, text)
    return side


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The parsed sidecar of weights file ``path`` (format, versions, arch, meta).

    Raises:
        CheckpointError: the sidecar is missing, not JSON, or lacks the architecture record.
    """
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(f"checkpoint sidecar not found: {side}")
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint sidecar {side} is not valid JSON: {exc}") from None
    arch = info.get("arch") if isinstance(info, dict) else None
    if not (isinstance(arch, dict) and isinstance(arch.get("name"), str) and isinstance(arch.get("kwargs"), dict)):
        raise CheckpointError(f"checkpoint sidecar {side} has no valid 'arch' record ({{'name': ..., 'kwargs': ...}})")
    return info


def load_checkpoint(
    path: str | Path,
    device: torch.device | str = "cpu",
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a safetensors checkpoint.

    Args:
        path: the weights file.
        device: where the model goes.
        arch: architecture name; overrides the sidecar (required when there is no sidecar).
        arch_kwargs: builder arguments for ``arch`` (default: none, i.e. the builder's defaults).

    Returns:
        ``(model, meta)``: the model in eval mode, and the sidecar's ``meta`` (``{}`` without a sidecar).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    side = sidecar_path(path)
    info = read_checkpoint_info(path) if side.is_file() else None
    if arch is None:
        if info is None:
            raise CheckpointError(f"checkpoint sidecar {side} is missing; pass arch= (and arch_kwargs=) to load {path}")
        arch, arch_kwargs = info["arch"]["name"], info["arch"]["kwargs"]
    state = read_safetensors(path)
    model = create_model(arch, seed=0, **(arch_kwargs or {}))  # seeded: loading leaves the global RNG alone
    apply_state_dict(model, state, source=f"checkpoint {path}", arch=arch)
    model.to(device)
    model.eval()
    return model, (info or {}).get("meta", {})
