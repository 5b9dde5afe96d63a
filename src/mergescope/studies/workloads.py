"""Workloads that make each merging family meaningful, trained with mergescope's own trainer
(:mod:`mergescope.studies.train`): which models are merged, where they came from, and what a merge is scored on.

The survey (seed 003, Tables 1-3) sorts merging into ensembling, weight aggregation and neuron alignment; each
assumes its own kind of models:

* ``seeds`` — N models from independent seeds on all classes (Git Re-Basin, REPAIR: the alignment family's
  setting; nothing shared but the architecture);
* ``halves`` — ZipIt!'s 5+5 split (Stoica et al. 2024, §5.1): two models from independent seeds, one on the
  classes 0..K/2−1, one on the rest (their anchors: CIFAR-10 ResNet20×4);
* ``halves_finetune`` — the same split as fine-tunes of ONE base model trained on all classes (task vectors:
  θ_k − θ_base);
* ``stratified_finetune`` — the thesis's stratified split (000 App. B: each half gets ``major`` of its favoured
  classes' images and 1 − ``major`` of the others'), as fine-tunes of the base;
* ``hparams`` — N fine-tunes of the base on all classes with different learning rates and label smoothing (model
  soups, Wortsman et al. 2022, §3);
* ``checkpoints`` — N checkpoints along one run: the base trained on, one epoch at a constant learning rate per
  checkpoint (SWA, Izmailov et al. 2018, Alg. 1).

Every workload keeps the same ``holdout`` images of the training split out of training (the held-out split a
greedy soup is scored on) and is scored jointly and per *subset*: the two halves of the classes (ZipIt!'s per-task
accuracy, :mod:`mergescope.evaluate.by_class`). Fine-tunes start from the base's checkpoint (``init``); every model
is written as a checkpoint with its sidecar, and a checkpoint already there for the same configuration is reused.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import ImageDataset, iter_batches
from ..errors import MergescopeError
from .train import TrainRunConfig, holdout_ids, training_ids


@dataclass(frozen=True)
class WorkloadConfig:
    """The sizes every workload shares (recorded in the manifest)."""

    arch: str = "cnn_digits"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    models: int = 2  # models per workload with a free count (seeds, hparams, checkpoints); halves: always 2
    epochs: int = 3  # epochs of a model trained from scratch (and of the base)
    finetune_epochs: int = 2  # epochs of a fine-tune of the base
    lr: float = 0.1  # peak learning rate from scratch
    finetune_lr: float = 0.02  # peak learning rate of a fine-tune (hparams: scaled per model; SWA's constant rate)
    batch_size: int = 128
    augment: bool = False
    holdout: int = 100  # training images kept out of every model's training (the held-out split)
    major: float = 0.8  # the stratified split's share of a half's favoured classes
    split_seed: int = 0


@dataclass(frozen=True)
class Member:
    """One model of a workload: how to train it, and from what (``init``: None, ``"base"`` or the index of the
    member it continues)."""

    name: str
    config: TrainRunConfig
    init: str | int | None = None


@dataclass(frozen=True)
class Workload:
    """A named way of making the models to merge."""

    name: str
    about: str
    needs_base: bool  # its members are fine-tunes of one base (task vectors are defined)
    members: Callable[[WorkloadConfig, int], list[Member]]  # (config, number of classes) -> the members


@dataclass
class BuiltWorkload:
    """A workload's trained models and what the merge methods read of it.

    Attributes:
        models: the models to merge (eval mode), the reference first.
        base: the shared base (None when the workload has none).
        checkpoints: name -> checkpoint path, the base included.
        train_ids: per model, the training images it saw (its own data for Fisher / RegMean).
        sample_counts: per model, its number of training examples (FedAvg's n_k).
        heldout_ids: the held-out training images.
        subsets: subset name -> its classes (per-subset accuracy).
    """

    workload: Workload
    models: list[nn.Module]
    names: list[str]
    base: nn.Module | None
    checkpoints: dict[str, Path]
    train_ids: list[torch.Tensor]
    sample_counts: list[int]
    heldout_ids: torch.Tensor
    subsets: dict[str, list[int]]

    def data(self, train: ImageDataset, batch_size: int) -> list[Callable]:
        """One batch factory per model over its own training images (AlignInputs.data)."""
        return [lambda ids=ids: iter_batches(train, batch_size, ids=ids) for ids in self.train_ids]


def halves(num_classes: int) -> dict[str, list[int]]:
    """The two halves of the classes, ZipIt!'s 5+5 tasks (the first ⌈K/2⌉ classes, then the rest), by name."""
    cut = (num_classes + 1) // 2
    return {f"classes 0-{cut - 1}": list(range(cut)), f"classes {cut}-{num_classes - 1}": list(range(cut, num_classes))}


def _config(cfg: WorkloadConfig, **kw: Any) -> TrainRunConfig:
    fields = dict(arch=cfg.arch, arch_kwargs=dict(cfg.arch_kwargs), epochs=cfg.epochs, batch_size=cfg.batch_size,
                  lr=cfg.lr, augment=cfg.augment, holdout=cfg.holdout, major=cfg.major, split_seed=cfg.split_seed)
    return TrainRunConfig(**{**fields, **kw})


def base_member(cfg: WorkloadConfig) -> Member:
    """The base every fine-tune starts from: seed 0, all classes, ``epochs`` from scratch."""
    return Member("base", _config(cfg, seed=0))


def _finetune(cfg: WorkloadConfig, name: str, seed: int, **kw: Any) -> Member:
    return Member(name, _config(cfg, **{"seed": seed, "epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr, **kw}),
                  "base")


def _seeds(cfg: WorkloadConfig, k: int) -> list[Member]:
    return [Member(f"seed {s}", _config(cfg, seed=s)) for s in range(1, cfg.models + 1)]


def _halves(cfg: WorkloadConfig, k: int) -> list[Member]:
    return [Member(name, _config(cfg, seed=s, classes=classes))
            for s, (name, classes) in enumerate(halves(k).items(), start=1)]


def _halves_finetune(cfg: WorkloadConfig, k: int) -> list[Member]:
    return [_finetune(cfg, name, s, classes=classes) for s, (name, classes) in enumerate(halves(k).items(), start=1)]


def _stratified_finetune(cfg: WorkloadConfig, k: int) -> list[Member]:
    return [_finetune(cfg, f"stratified {p}", s, part=p) for s, p in enumerate("ab", start=1)]


def _hparams(cfg: WorkloadConfig, k: int) -> list[Member]:
    """Learning rates finetune_lr × 2^(i − (N−1)/2) (centred on it), label smoothing 0.1 on every other one."""
    scales = [2 ** (i - (cfg.models - 1) / 2) for i in range(cfg.models)]
    return [_finetune(cfg, f"lr {cfg.finetune_lr * s:.3g}" + (", smoothing 0.1" if i % 2 else ""), i + 1,
                      lr=cfg.finetune_lr * s, label_smoothing=0.1 * (i % 2)) for i, s in enumerate(scales)]


def _checkpoints(cfg: WorkloadConfig, k: int) -> list[Member]:
    """SWA's tail: from the base, one epoch per checkpoint at the constant rate finetune_lr, each continuing the
    one before."""
    return [Member(f"epoch +{i + 1}", _config(cfg, seed=i + 1, epochs=1, lr=cfg.finetune_lr, schedule="constant"),
                   "base" if i == 0 else i - 1) for i in range(cfg.models)]


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("seeds", "independent seeds on all classes (alignment's setting)", False, _seeds),
    Workload("halves", "ZipIt!'s 5+5: independent seeds, one per half of the classes", False, _halves),
    Workload("halves_finetune", "fine-tunes of one base, one per half of the classes (task vectors)", True,
             _halves_finetune),
    Workload("stratified_finetune", "fine-tunes of one base on the thesis's stratified halves", True,
             _stratified_finetune),
    Workload("hparams", "fine-tunes of one base with different learning rates and label smoothing (soups)", True,
             _hparams),
    Workload("checkpoints", "checkpoints along one run: the base, then one constant-rate epoch each (SWA)", True,
             _checkpoints),
)}


def get_workload(name: str) -> Workload:
    """The workload ``name``; an unknown one is a one-line error listing the known ones."""
    if name not in WORKLOADS:
        raise MergescopeError(f"unknown workload '{name}'; known: {', '.join(WORKLOADS)}")
    return WORKLOADS[name]


def _trained(path: Path, config: TrainRunConfig, train: ImageDataset, device: torch.device | str,
             progress: bool) -> nn.Module:
    """The model of ``config`` at ``path``: loaded when its sidecar records this very configuration on this
    data, else trained and saved there."""
    from ..train import load_checkpoint, save_checkpoint
    from ..train.checkpoint import read_checkpoint_info, sidecar_path
    from .train import run

    record = json.loads(json.dumps(asdict(config)))
    if path.is_file() and sidecar_path(path).is_file():
        meta = read_checkpoint_info(path).get("meta", {})
        if meta.get("config") == record and meta.get("dataset_fingerprint") == train.fingerprint:
            return load_checkpoint(path, device=device)[0]
    model, _, meta = run(train, config, device=device, progress=progress)
    save_checkpoint(path, model, {**meta, "config": record})
    return model


def build_workload(name: str, cfg: WorkloadConfig, train: ImageDataset, folder: str | os.PathLike,
                   device: torch.device | str = "cpu", progress: bool = False) -> BuiltWorkload:
    """Train (or reuse from ``folder``) the base and the members of workload ``name`` on ``train``.

    The base is ``folder/base.safetensors`` (shared by every workload of one config); the members
    ``folder/<name>/<i>.safetensors``. A fine-tune's ``init`` is the checkpoint it starts from.
    """
    workload = get_workload(name)
    folder = Path(folder)
    members = workload.members(cfg, len(train.classes))
    paths: dict[str, Path] = {}
    base = None
    if workload.needs_base:
        paths["base"] = folder / "base.safetensors"
        base = _trained(paths["base"], base_member(cfg).config, train, device, progress)
    models, ids = [], []
    for i, member in enumerate(members):
        config = member.config
        if member.init is not None:
            start = paths["base"] if member.init == "base" else folder / name / f"{member.init}.safetensors"
            config = replace(config, init=str(start))
        path = paths[member.name] = folder / name / f"{i}.safetensors"
        models.append(_trained(path, config, train, device, progress).eval())
        got = training_ids(train, config)
        ids.append(torch.arange(len(train)) if got is None else got)
    return BuiltWorkload(workload, models, [m.name for m in members], base, paths, ids, [len(i) for i in ids],
                         holdout_ids(train, cfg.holdout, cfg.split_seed), halves(len(train.classes)))


def check_workloads(names: Sequence[str]) -> list[str]:
    """The workloads in order without repeats; an unknown one is a one-line error."""
    for n in names:
        get_workload(n)
    return list(dict.fromkeys(names))
