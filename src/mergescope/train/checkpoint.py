"""Checkpoints: safetensors weights plus a JSON sidecar recording architecture and metadata.

``run/a.safetensors`` holds ``model.state_dict()`` (contiguous CPU tensors); ``run/a.json`` holds::

    {"format": "mergescope-checkpoint", "format_version": 1, "mergescope_version": "0.1.0",
     "arch": {"name": "resnet20", "kwargs": {...}}, "weights": "a.safetensors", "meta": {...}}

Both files are written atomically (temporary file + ``os.replace``).

:func:`load_checkpoint` also takes checkpoints from elsewhere: any state-dict file (safetensors, or ``.pt/.pth/.bin``
read with ``weights_only=True``) plus an architecture name (a zoo name, ``tv_*`` or ``timm:NAME``), its
``num_classes`` and input channels read off the tensors unless given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergescope.runs.atomic import atomic_save_tensors, atomic_write_text
from mergescope.runs.jsonio import dumps, package_version
from mergescope.data.cache import file_sha256
from mergescope.errors import CheckpointError
from mergescope.models import apply_state_dict, create_model, infer_shape_kwargs, load_state_dict_file, model_config

FORMAT = "mergescope-checkpoint"
FORMAT_VERSION = 1

__all__ = [
    "checkpoint_sha256",
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
        dumps(record)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata for {path} is not JSON-serialisable: {exc}") from None
    # Copies, so tied/shared parameters don't trip safetensors' shared-memory check.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(path, tensors, {"format": FORMAT})
    # the sidecar names the weights' sha256: a kill between the two writes leaves a pair that says it is not one
    atomic_write_text(side, dumps({**record, "weights_sha256": file_sha256(path)}))
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


def check_pair(path: Path, info: dict[str, Any], sha256: str | None = None) -> None:
    """Refuse weights that are not the ones their sidecar was written with (its ``weights_sha256``, when the sidecar
    names this file as its weights; sidecars written before it was recorded are not checked): what a kill between
    the two writes leaves. A sidecar shared with a file of another name (``m.pth`` beside ``m.safetensors``) only
    describes the architecture. ``sha256``: the file's, when the caller has it already."""
    want = info.get("weights_sha256") if info.get("weights") == path.name else None
    if want is not None and (sha256 or file_sha256(path)) != want:
        raise CheckpointError(f"{path} is not the file its sidecar {sidecar_path(path)} was written with (sha256 "
                              "differs): the pair is incomplete — a write that was interrupted, or one file replaced; "
                              "write the checkpoint again")


def interrupted_write(path: str | Path) -> bool:
    """Whether ``path`` is what a kill during :func:`save_checkpoint` leaves: mergescope weights whose sidecar is
    missing or was written for other weights (safe to write again without ``--overwrite``)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            ours = (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError):
        return False
    if not ours:
        return False
    try:
        info = read_checkpoint_info(path)
        check_pair(path, info)
    except CheckpointError:
        return True
    return False


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 hex digest of the weights file ``path`` (not its sidecar), to record and later check a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    return file_sha256(path)


def _sidecar_arch(
    side: Path, info: dict[str, Any], arch: str | None, arch_kwargs: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The sidecar's architecture, after checking that an explicitly given one agrees with it."""
    name, recorded = info["arch"]["name"], info["arch"]["kwargs"]
    if arch is not None and arch != name:
        raise CheckpointError(f"--arch {arch} disagrees with the sidecar {side}, which records {name}")
    for key, value in arch_kwargs.items():
        if key not in recorded:
            raise CheckpointError(f"--arch-kwargs {key}={json.dumps(value)} but {side} records no {key} "
                                  f"(it records: {', '.join(recorded) or 'none'})")
        if recorded[key] != value:
            raise CheckpointError(f"--arch-kwargs {key}={json.dumps(value)} but {side} records "
                                  f"{key}={json.dumps(recorded[key])}")
    return name, dict(recorded)


def _build_to_fit(arch: str, arch_kwargs: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """``arch`` built with ``arch_kwargs``, its shape arguments not given there read off ``state``."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        shapes = create_model(arch, seed=0, **arch_kwargs)
    inferred = {k: v for k, v in infer_shape_kwargs(shapes, state).items() if k not in arch_kwargs}
    return create_model(arch, seed=0, **arch_kwargs, **inferred)  # seeded: loading leaves the global RNG alone


def load_checkpoint(
    path: str | Path,
    device: torch.device | str = "cpu",
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    sha256: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a mergescope checkpoint or from any state-dict file.

    Args:
        path: the weights file: ``*.safetensors``/``*.st``, or ``*.pt``/``*.pth``/``*.bin`` (``torch.load`` with
            ``weights_only=True``); a ``{"state_dict": ...}`` wrapper and a ``module.`` prefix on every key are
            undone.
        device: where the model goes.
        arch: architecture name (a zoo name, ``tv_*``, ``timm:NAME``); required without a sidecar, and must
            equal the sidecar's when both are there.
        arch_kwargs: builder arguments; with a sidecar each must equal the recorded one. Without one, a
            ``num_classes`` or input-channel argument not given is read off the classifier's / stem's shape.
        sha256: the weights file's sha256 when the caller has computed it (:func:`checkpoint_sha256`), so the check
            against the sidecar does not read the file a second time.

    Returns:
        ``(model, meta)``: the model in eval mode, and the sidecar's ``meta`` (``{}`` without a sidecar).

    Example:
        >>> model, _ = load_checkpoint("a.pth", arch="tv_resnet18")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    side = sidecar_path(path)
    info = read_checkpoint_info(path) if side.is_file() else None
    kwargs = dict(arch_kwargs or {})
    if info is not None:
        arch, kwargs = _sidecar_arch(side, info, arch, kwargs)
    elif arch is None:
        raise CheckpointError(f"checkpoint sidecar {side} is missing, so the architecture of {path} is unknown; "
                              "pass --arch NAME [--arch-kwargs JSON] (a zoo name, tv_* or timm:NAME)")
    state = load_state_dict_file(path)  # a damaged file is named as such first
    if info is not None:
        check_pair(path, info, sha256)
    model = _build_to_fit(arch, kwargs, state)
    apply_state_dict(model, state, source=f"checkpoint {path}", arch=arch)
    model.to(device)
    model.eval()
    return model, (info or {}).get("meta", {})
