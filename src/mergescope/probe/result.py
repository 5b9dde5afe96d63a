"""What a probe returns: for every model and layer, each channel's top-k images, moments and subset activations.

Pure data (tensors plus JSON-able metadata), rendered elsewhere; :mod:`mergescope.probe.store` writes and
reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import MergescopeError
from .stats import Moments


@dataclass
class LayerProbe:
    """The probe of one layer of one model: C channels, k' = min(k, images seen).

    A channel's activation for an image is the spatial max (or mean, see :attr:`ProbeResult.reduction`) of its
    feature map, taken where the layer outputs it (after the nonlinearity; ResNets: the block output).
    """

    topk_values: torch.Tensor  # float32 [C, k']: each channel's largest activations, descending
    topk_ids: torch.Tensor  # int64 [C, k']: their image ids (equal activations: smaller id first)
    moments: Moments  # per-channel count, mean and m2 (float64 [C]) of the activation over all images
    subset: torch.Tensor | None = None  # float32 [|D'|, C]: activations on the subset (16-bit values,
    #                                     probe.state.compact_subset), rows in subset_ids order

    @property
    def channels(self) -> int:
        return int(self.topk_ids.shape[0])

    def reindexed(self, order: torch.Tensor) -> "LayerProbe":
        """The probe of this layer with its channels re-indexed: channel ``c`` of the result is channel
        ``order[c]`` of this one — what the probe of a model permuted by :func:`mergescope.perm.permute_model`
        finds at this layer (``order`` from :func:`mergescope.perm.layer_orders`)."""
        subset = None if self.subset is None else self.subset[:, order]
        return LayerProbe(self.topk_values[order], self.topk_ids[order], self.moments.reindexed(order), subset)

    @property
    def mean(self) -> torch.Tensor:
        """float64 [C]: mean activation per channel."""
        return self.moments.mean

    @property
    def std(self) -> torch.Tensor:
        """float64 [C]: population standard deviation of the activation per channel."""
        return self.moments.std


@dataclass
class ProbeResult:
    """The result of :func:`mergescope.probe.probe`.

    ``result["a", "layer1.0"]`` is the :class:`LayerProbe` of layer ``layer1.0`` of model ``a``.
    """

    probes: dict[str, dict[str, LayerProbe]]  # model -> layer -> probe, in the order they were asked for
    k: int  # top-k size asked for
    reduction: str  # "max" or "mean": how a feature map becomes one activation per image
    dataset: dict[str, Any]  # {"name", "fingerprint", "size"}
    num_images: int  # images seen
    subset_ids: torch.Tensor | None  # int64 [|D'|]: the fixed subset D', or None
    config: dict[str, Any] = field(default_factory=dict)  # resolved config, incl. model weight hashes
    path: Path | None = None  # the safetensors file it is stored in, if any

    @property
    def models(self) -> list[str]:
        return list(self.probes)

    @property
    def layers(self) -> dict[str, list[str]]:
        return {m: list(layers) for m, layers in self.probes.items()}

    def __getitem__(self, key: tuple[str, str]) -> LayerProbe:
        model, layer = key
        if model not in self.probes:
            raise MergescopeError(f"no model '{model}' in this probe; models: {', '.join(self.probes)}")
        if layer not in self.probes[model]:
            raise MergescopeError(f"no layer '{layer}' probed in model '{model}'; "
                                  f"layers: {', '.join(self.probes[model])}")
        return self.probes[model][layer]

    def __repr__(self) -> str:
        n_layers = sum(len(v) for v in self.probes.values())
        return (f"ProbeResult(models={self.models}, layers={n_layers}, k={self.k}, reduction={self.reduction!r}, "
                f"dataset={self.dataset.get('name')!r}, num_images={self.num_images}, "
                f"subset={None if self.subset_ids is None else len(self.subset_ids)})")
