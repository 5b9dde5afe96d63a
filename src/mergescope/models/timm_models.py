"""timm architectures, spelled ``timm:NAME`` (``timm:resnet18``), built randomly initialised; weights come from a file.

Each name becomes a registry entry on first use: ``timm.create_model(NAME, pretrained=False, num_classes=...,
in_chans=...)``, with ``num_classes`` defaulting to the name's pretrained config (1000 for ImageNet models) and
the natural input size taken from that config (``(3, 224, 224)`` for ``resnet18``). timm is imported only
here, and only when a ``timm:`` name is asked for, so the package works without it.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType

from torch import nn

from mergescope.errors import ArchitectureError
from mergescope.models._layers import check_positive
from mergescope.models._registry import ModelEntry, register_namespace

PREFIX = "timm"
_DEFAULT_NUM_CLASSES = 1000  # timm's own default when a name has no pretrained config


def _import_timm() -> ModuleType:
    try:
        import timm
    except ImportError:
        raise ArchitectureError(f"'{PREFIX}:NAME' architectures need the timm package: pip install timm") from None
    return timm


@lru_cache(maxsize=None)
def timm_entry(name: str) -> ModelEntry:
    """The registry entry of timm model ``name`` (the part after ``timm:``)."""
    timm = _import_timm()
    if not timm.is_model(name):
        hint = "python -c \"import timm; print(timm.list_models('*resnet*'))\""
        raise ArchitectureError(f"unknown timm model '{name}'; find names with {hint}")
    cfg = timm.models.get_pretrained_cfg(name)
    default_classes = cfg.num_classes if cfg is not None and cfg.num_classes is not None else _DEFAULT_NUM_CLASSES
    input_size = getattr(cfg, "input_size", None)  # (C, H, W)
    full_name = f"{PREFIX}:{name}"

    def builder(num_classes: int = default_classes, in_chans: int = 3) -> nn.Module:
        """timm's ``name`` with ``pretrained=False``."""
        check_positive(full_name, in_chans=in_chans)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ArchitectureError(f"model '{full_name}' needs num_classes to be an integer >= 0 "
                                    f"(0: no classifier), got {num_classes!r}")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)

    builder.__name__ = name
    return ModelEntry(name=full_name, builder=builder, transient=(),
                      image_size=tuple(input_size[1:]) if input_size else None, channels_arg="in_chans")


register_namespace(PREFIX, timm_entry)
