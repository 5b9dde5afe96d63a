"""The preamble every study shares, written once: load the checkpoints (in any form the front door accepts,
:func:`mergescope.train.load_checkpoint`), check they are one architecture, open the data and check it fits the
models, and describe the models and data for the manifest — before a run folder is touched, so bad input never
leaves a half-written folder.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import ImageDataset, open_dataset
from ..errors import ArchitectureError, MergescopeError
from ..models import check_input_fits


def model_tags(n: int) -> list[str]:
    """A, B, C… for the models of a study, the reference first."""
    return [chr(ord("A") + i) if i < 26 else f"M{i}" for i in range(n)]


@dataclass
class LoadedModels:
    """Checkpoints loaded for a study: the models (eval mode, on the device) and where each came from."""

    paths: list[Path]
    models: list[nn.Module]
    metas: list[dict]
    sha256: list[str]
    arch: str | None = None  # the --arch the checkpoints were loaded with (None: their sidecars)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def tags(self) -> list[str]:
        return model_tags(len(self.models))

    def record(self) -> dict[str, dict]:
        """Tag -> checkpoint path, its sha256 and the sidecar's metadata (the manifest's ``models``)."""
        return {t: {"checkpoint": str(p), "sha256": h, "meta": m}
                for t, p, h, m in zip(self.tags, self.paths, self.sha256, self.metas)}

    def sources(self) -> dict[str, dict]:
        """Tag -> {"checkpoint", "sha256"}: what an alignment or a later study checks the checkpoints against."""
        return {t: {"checkpoint": str(p), "sha256": h} for t, p, h in zip(self.tags, self.paths, self.sha256)}


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """Raise a one-line ArchitectureError unless both models have the same class and tensors."""
    if type(model_a) is not type(model_b):
        raise ArchitectureError(f"cannot align a {type(model_a).__name__} with a {type(model_b).__name__}")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for k in sa.keys() | sb.keys():
        if k not in sa or k not in sb:
            raise ArchitectureError(f"models differ: tensor '{k}' exists in only one of them")
        if sa[k].shape != sb[k].shape:
            raise ArchitectureError(f"models differ: '{k}' is {tuple(sa[k].shape)} vs {tuple(sb[k].shape)}")


def load_models(checkpoints: Sequence[str | os.PathLike], *, arch: str | None = None,
                arch_kwargs: Mapping[str, Any] | None = None, device: torch.device | str = "cpu",
                at_least: int = 2) -> LoadedModels:
    """Load ``checkpoints`` (``arch``/``arch_kwargs`` apply to every file; a sidecar, when present, must agree)
    and check that they are one architecture.

    Raises:
        MergescopeError: fewer than ``at_least`` checkpoints, an unreadable file, or models that differ.
    """
    from ..train import checkpoint_sha256, load_checkpoint

    if len(checkpoints) < at_least:
        raise MergescopeError(f"give at least {at_least} checkpoints (got {len(checkpoints)}): the reference "
                              "first, then the models to align to it")
    digests = [checkpoint_sha256(c) for c in checkpoints]  # each file read once for its hash
    loaded = [load_checkpoint(c, device=device, arch=arch, arch_kwargs=dict(arch_kwargs or {}) or None, sha256=h)
              for c, h in zip(checkpoints, digests)]
    for (model, _), path in zip(loaded[1:], checkpoints[1:]):
        try:
            check_same_architecture(loaded[0][0], model)
        except ArchitectureError as e:
            raise ArchitectureError(f"{checkpoints[0]} and {path}: {e}") from None
    return LoadedModels([Path(c) for c in checkpoints], [m for m, _ in loaded], [meta for _, meta in loaded],
                        digests, arch, dict(arch_kwargs or {}))


def open_data(data: str, split: str, model: nn.Module | None = None, label: str = "the models",
              eval_splits: Sequence[str] = ()) -> tuple[ImageDataset, dict[str, ImageDataset]]:
    """The study's images (``split``) and the evaluation splits, checked to fit ``model``'s input."""
    images = open_dataset(data, split=split)
    if model is not None:
        check_input_fits(model, images, label)
    return images, {s: images if s == split else open_dataset(data, split=s) for s in eval_splits}


def dataset_record(ds: ImageDataset) -> dict[str, str]:
    """What the manifest says about a dataset."""
    return {"name": ds.name, "fingerprint": ds.fingerprint}


def stats_ids(n_images: int, wanted: int | None, seed: int = 0) -> list[int] | None:
    """``wanted`` fixed random image ids (seeded), sorted; None (all images) when not fewer than all."""
    if not wanted or wanted >= n_images:
        return None
    return sorted(torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))[:wanted].tolist())


@dataclass
class StudyInputs:
    """What a study of checkpoints reads and where it writes (the command line's shared options).

    Attributes:
        checkpoints: the reference first, then the other models.
        data: the dataset spec (:func:`mergescope.data.open_dataset`).
        out: the run folder.
        arch, arch_kwargs: the architecture of every checkpoint, when they have no sidecar (or to check it).
        split: the images the study computes from (matching, statistics, ranking).
        eval_splits: the splits merged models are evaluated on.
        stats_images: use this many fixed random images of ``split`` for statistics (None: all).
    """

    checkpoints: Sequence[str]
    data: str
    out: str
    arch: str | None = None
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    split: str = "train"
    eval_splits: Sequence[str] = ("test",)
    stats_images: int | None = None
    device: str = "cpu"
    progress: bool = False
    overwrite: bool = False

    def record(self) -> dict[str, Any]:
        """The inputs as the manifest records them."""
        return {"checkpoints": [str(c) for c in self.checkpoints], "data": self.data, "arch": self.arch,
                "arch_kwargs": dict(self.arch_kwargs), "split": self.split, "eval_splits": list(self.eval_splits),
                "stats_images": self.stats_images}


def prepare(inputs: StudyInputs, at_least: int = 2) -> tuple[LoadedModels, ImageDataset, dict[str, ImageDataset]]:
    """Load and check the checkpoints and the data of a study (nothing is written)."""
    loaded = load_models(inputs.checkpoints, arch=inputs.arch, arch_kwargs=inputs.arch_kwargs,
                         device=inputs.device, at_least=at_least)
    images, evals = open_data(inputs.data, inputs.split, loaded.models[0], f"checkpoint {inputs.checkpoints[0]}",
                              inputs.eval_splits)
    return loaded, images, evals


@dataclass
class FeatureRun:
    """A finished feature study (a ``mergescope probe`` or demo run folder) that a later study adds to."""

    path: Path
    results: dict
    manifest: dict
    features: dict  # results.json's "features": data, split, views
    dataset: ImageDataset  # the probed images

    def models(self, tags: Sequence[str], device: torch.device | str = "cpu",
               alignment: Any | None = None) -> dict[str, nn.Module]:
        """The run's checkpoints of ``tags``, built as the run built them (its ``--arch``) and, with the run's
        stored alignment (:class:`~mergescope.align.store.StoredAlignments`), checked against the sha256 it
        recorded."""
        from ..runs import run_arch, run_checkpoints
        from ..train import load_checkpoint

        paths = run_checkpoints(self.path, self.manifest, tags)
        missing = [t for t in tags if t not in paths]
        if missing:
            raise MergescopeError(f"no checkpoint of model {missing[0]} in {self.path}'s manifest")
        if alignment is not None:
            alignment.check_sources({t: paths[t] for t in tags})
        arch = run_arch(self.manifest)
        return {t: load_checkpoint(paths[t], device=device, **arch)[0] for t in tags}


def open_feature_run(run_dir: str | os.PathLike, *, marker: str, holds: str, overwrite: bool,
                     need_probe: bool = False) -> FeatureRun:
    """The preamble of a study that adds to a feature study's run folder (compare, regress): the folder read and
    every data file it lists checked against the manifest's sha256 (a folder changed after its run is not added
    to), refused unless it holds a feature study (and its probe, with ``need_probe``), and refused if it already
    holds this study's ``marker`` file (``holds``: what that is, for the message) unless ``overwrite``; the probed
    images opened."""
    from ..runs import load_run, verify_inputs

    run_dir = Path(run_dir)
    results, manifest = load_run(run_dir)
    verify_inputs(run_dir, manifest)
    features = results.get("features")
    if not features or (need_probe and not (run_dir / "probe").is_dir()):
        where = "no 'features' in results.json or no probe/" if need_probe else "no 'features' in results.json"
        raise MergescopeError(f"{run_dir} holds no feature study ({where}); make one with `mergescope probe` or "
                              "`mergescope demo`")
    if (run_dir / marker).exists() and not overwrite:
        raise MergescopeError(f"{run_dir} already holds {holds} ({marker}); pass --overwrite to replace it")
    return FeatureRun(run_dir, results, manifest, features, open_dataset(features["data"], split=features["split"]))
