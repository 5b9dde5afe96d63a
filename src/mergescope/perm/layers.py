"""Which layers a study looks at: the thesis's convolutional channels by default, linear layers on request.

The thesis probes the channels of the convolutional layers and the outputs of the residual blocks (000 §3.1.3 and
App. C) — every observable layer whose tensor is a feature map with spatial positions (``TapPoint.spatial``). The
fully connected layers of a CNN's head are left out unless asked for: in torchvision's AlexNet the two
4,096-unit linear layers would otherwise take most of a probe's pages.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import MergescopeError
from .spec import PermSpec

LAYER_SELECTIONS = ("conv", "all")  # the named selections; anything else is a list of layer names


def select_layers(spec: PermSpec, layers: str | Sequence[str] = "conv") -> list[str]:
    """The canonical names of the layers of ``spec`` that ``layers`` selects, in graph order for a named selection.

    Args:
        spec: the model's spec (:func:`mergescope.perm.build_spec`); its :attr:`PermSpec.layers` are the candidates.
        layers: ``"conv"`` (default) — every layer whose tensor has spatial positions: the conv channels
            (post-activation) and the residual block outputs, as the thesis probes them. A model with no such
            layer (an MLP: only linear layers) gets all its layers rather than an empty selection.
            ``"all"`` — every observable layer, linear ones included. Or one layer name, or a sequence of them
            (kept in the given order, duplicates dropped), each a name of ``spec.layers``.

    Returns:
        The selected layer names.

    Raises:
        MergescopeError: an unknown layer name, or an empty sequence (one line listing the valid names).

    Example:
        >>> from mergescope.models import create_model
        >>> from mergescope.perm import build_spec
        >>> spec = build_spec(create_model("tv_alexnet", num_classes=10))
        >>> select_layers(spec)  # the five conv ReLUs; "all" adds classifier.2 and classifier.5
        ['features.1', 'features.4', 'features.7', 'features.9', 'features.11']
    """
    if isinstance(layers, str) and layers in LAYER_SELECTIONS:
        conv = [name for name, tap in spec.layers.items() if tap.spatial]
        return conv if layers == "conv" and conv else list(spec.layers)
    names = [layers] if isinstance(layers, str) else list(layers)
    unknown = [n for n in names if n not in spec.layers]
    if unknown or not names:
        what = f"unknown layer {', '.join(map(repr, unknown))}" if unknown else "no layer named"
        raise MergescopeError(f"layers: {what}; give {' or '.join(LAYER_SELECTIONS)} or layer names from: "
                              f"{', '.join(spec.layers)}")
    return list(dict.fromkeys(names))
