"""Model registry: builders register under a name, ``create_model`` builds them and records how.

Every model made by :func:`create_model` carries ``model.mergescope_arch = {"name": ..., "kwargs": {...}}``
(all builder arguments, defaults filled in), so a checkpoint can rebuild exactly the same architecture.

Besides names registered one by one, a *namespace* resolves a whole family of names spelled ``PREFIX:NAME``
(``timm:resnet18``) to entries on demand, so a library's own model list needn't be copied in here.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from mergescope.errors import ArchitectureError

ARCH_ATTR = "mergescope_arch"

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture."""

    name: str  # registry key, e.g. "resnet20"
    builder: Builder  # callable(**kwargs) -> nn.Module
    transient: tuple[str, ...]  # builder kwargs that don't shape the architecture (not recorded)
    image_size: tuple[int, ...] | None  # spatial size of a natural input; None: flat (MLP) input, or unknown
    channels_arg: str = "in_channels"  # the builder argument giving the number of input channels


_REGISTRY: dict[str, ModelEntry] = {}
_NAMESPACES: dict[str, Callable[[str], ModelEntry]] = {}


def register_model(
    name: str, *, transient: tuple[str, ...] = (), image_size: tuple[int, ...] | None = (32, 32)
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` under ``name``.

    Args:
        name: registry key; must be unique.
        transient: keyword arguments that only affect initial values (e.g. ``weights_path``) and are left out
            of the recorded architecture, since a checkpoint overwrites the weights anyway.
        image_size: the input's spatial size the architecture is designed for; with ``in_channels`` it becomes
            ``model.input_size`` (C, H, W), which tracing uses for an example input. None: a flat input of
            ``in_features``.

    Returns:
        The decorator; it returns the builder unchanged.
    """

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ArchitectureError(f"model name '{name}' is registered twice")
        _REGISTRY[name] = ModelEntry(name=name, builder=builder, transient=tuple(transient),
                                     image_size=image_size)
        return builder

    return decorator


def register_namespace(prefix: str, resolve: Callable[[str], ModelEntry]) -> None:
    """Make every name ``prefix:NAME`` resolve to ``resolve(NAME)`` (which raises ArchitectureError if unknown).

    Args:
        prefix: the part before the colon, e.g. ``"timm"``; must be unique.
        resolve: maps ``NAME`` to its entry; the entry's ``name`` must be the full ``prefix:NAME``.
    """
    if prefix in _NAMESPACES:
        raise ArchitectureError(f"model namespace '{prefix}:' is registered twice")
    _NAMESPACES[prefix] = resolve


def list_models() -> list[str]:
    """Names of all registered architectures, sorted (namespaces such as ``timm:NAME`` not expanded)."""
    return sorted(_REGISTRY)


def get_model_entry(name: str) -> ModelEntry:
    """The entry of a registered name or of a ``prefix:NAME`` in a registered namespace."""
    prefix, colon, rest = name.partition(":")
    if colon and prefix in _NAMESPACES:
        return _NAMESPACES[prefix](rest)
    if name not in _REGISTRY:
        spaces = "".join(f" or {p}:NAME" for p in sorted(_NAMESPACES))
        raise ArchitectureError(f"unknown model '{name}'; known models: {', '.join(list_models())}{spaces}")
    return _REGISTRY[name]


def _input_size(entry: ModelEntry, kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    """(C, H, W) of a natural input, (in_features,) for a flat one, None when unknown."""
    if entry.image_size is not None:
        return (kwargs[entry.channels_arg], *entry.image_size)
    return (kwargs["in_features"],) if "in_features" in kwargs else None


def _bind_kwargs(entry: ModelEntry, kwargs: dict[str, Any]) -> dict[str, Any]:
    """All builder arguments with defaults filled in; unknown arguments raise ArchitectureError."""
    sig = inspect.signature(entry.builder)
    try:
        bound = sig.bind(**kwargs)
    except TypeError:
        unknown = sorted(set(kwargs) - set(sig.parameters))
        raise ArchitectureError(
            f"model '{entry.name}' has no argument(s) {', '.join(unknown) or '?'}; "
            f"it takes: {', '.join(sig.parameters)}"
        ) from None
    bound.apply_defaults()
    return dict(bound.arguments)


def create_model(
    name: str,
    *,
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered architecture.

    Args:
        name: a name from :func:`list_models`, or ``PREFIX:NAME`` in a registered namespace (``timm:resnet18``).
        seed: if given, parameters are initialised under ``torch.manual_seed(seed)`` without disturbing the
            global RNG; otherwise the global RNG is used.
        device: where to put the model (default: CPU).
        dtype: parameter dtype (default: float32).
        **kwargs: builder arguments (``num_classes``, ``in_channels``, ``width``, ...).

    Returns:
        The model, with ``model.mergescope_arch`` recording name and full kwargs.
    """
    entry = get_model_entry(name)
    full_kwargs = _bind_kwargs(entry, kwargs)
    if seed is None:
        model = entry.builder(**full_kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = entry.builder(**full_kwargs)
    recorded = {k: v for k, v in full_kwargs.items() if k not in entry.transient}
    setattr(model, ARCH_ATTR, {"name": name, "kwargs": recorded})
    input_size = _input_size(entry, full_kwargs)
    if input_size is not None:
        model.input_size = input_size
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def model_config(model: nn.Module) -> dict[str, Any]:
    """The ``{"name", "kwargs"}`` record of a model built by :func:`create_model` (a copy).

    Raises:
        ArchitectureError: the model wasn't built by :func:`create_model`.
    """
    arch = getattr(model, ARCH_ATTR, None)
    if not isinstance(arch, dict):
        raise ArchitectureError(
            f"{type(model).__name__} was not built by mergescope.models.create_model, so its architecture is unknown"
        )
    return copy.deepcopy(arch)
