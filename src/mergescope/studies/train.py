"""``mergescope train``: one model trained from the zoo and saved as a checkpoint (safetensors + JSON sidecar) —
also the ``train`` stage of ``mergescope study``.

A model is identified by its architecture, its seed (initialisation and data order) and, for the thesis's
stratified pair (000 App. B), the half of the class split it sees (``part``); same config, same data, same device
→ the same weights. A fine-tune starts from a checkpoint's weights instead of the seed's initialisation (``init``;
its path and sha256 are recorded) and may see only some classes (``classes``, e.g. ZipIt!'s 0-4 / 5-9 halves);
the sidecar records the classes and the number of training examples (FedAvg's n_k).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import ImageDataset, open_dataset, stratified_pair
from ..errors import MergescopeError
from ..timing import record_since, since_here, stage


@dataclass
class TrainRunConfig:
    """One model to train (recorded in its sidecar)."""

    arch: str  # zoo name, tv_NAME or timm:NAME
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)  # in_channels / num_classes default to the data's
    seed: int = 0
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    label_smoothing: float = 0.0
    augment: bool = False
    amp: bool = False
    eval: bool = False  # evaluate on the test split after training
    part: str | None = None  # "a" or "b": train on one half of the stratified class split
    major: float = 0.8  # stratified split: share of the first half of classes
    split_seed: int = 0
    init: str | None = None  # start from this checkpoint's weights (a fine-tune; its architecture must be arch's)
    classes: Sequence[int] | None = None  # train on the images of these classes only (None: all)
    holdout: int = 0  # keep this many fixed images (stratified, seeded by split_seed) out of training: held out
    schedule: str = "onecycle"  # the learning-rate schedule (mergescope.train.list_schedules; SWA: "constant")


def parse_classes(text: str, num_classes: int | None = None) -> list[int]:
    """``"0-4"`` / ``"0,2,5-7"`` -> the sorted class indices; a one-line error names ``--classes`` otherwise."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise MergescopeError(f"--classes takes class indices and ranges like 0-4 or 0,2,5-7, got {text!r}") from None
    if not out or (num_classes is not None and max(out) >= num_classes):
        raise MergescopeError(f"--classes {text!r} must name classes in 0..{(num_classes or 1) - 1}")
    return sorted(out)


def holdout_ids(data: ImageDataset, n: int, seed: int = 0) -> torch.Tensor:
    """The ``n`` held-out image ids (spread evenly over the classes, seeded) that ``holdout = n`` keeps out."""
    from ..data.splits import stratified_subset

    return torch.as_tensor(stratified_subset(data.targets, n, seed=seed) if n else [], dtype=torch.int64)


def training_ids(data: ImageDataset, cfg: TrainRunConfig) -> torch.Tensor | None:
    """The ids a config trains on: its half of the stratified split (``part``), restricted to ``classes``, without
    the ``holdout`` images (None: every image)."""
    ids = None
    if cfg.holdout:
        keep = torch.ones(len(data), dtype=torch.bool)
        keep[holdout_ids(data, cfg.holdout, cfg.split_seed)] = False
        ids = torch.nonzero(keep).flatten()
    if cfg.part:
        ids_a, ids_b = stratified_pair(data.targets, major=cfg.major, seed=cfg.split_seed)
        part = torch.as_tensor(ids_a if cfg.part == "a" else ids_b)
        ids = part if ids is None else part[torch.isin(part, ids)]
    if cfg.classes is not None:
        k = len(data.classes)
        if not cfg.classes or any(not 0 <= c < k for c in cfg.classes):
            raise MergescopeError(f"classes must be indices in 0..{k - 1}, got {list(cfg.classes)}")
        keep = torch.isin(torch.as_tensor(data.targets), torch.as_tensor(list(cfg.classes)))
        ids = torch.nonzero(keep).flatten() if ids is None else ids[keep[ids]]
    return ids


def initial_model(data: ImageDataset, cfg: TrainRunConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The model training starts from: the seed's initialisation, or ``cfg.init``'s weights (a one-line error
    when that checkpoint is not of ``cfg.arch``)."""
    from ..models import create_model
    from ..train import load_checkpoint

    kwargs = {"in_channels": data.num_channels, "num_classes": len(data.classes), **dict(cfg.arch_kwargs)}
    if cfg.init is None:
        return create_model(cfg.arch, seed=cfg.seed, **kwargs)
    return load_checkpoint(cfg.init, device=device, arch=cfg.arch, arch_kwargs=dict(cfg.arch_kwargs) or None)[0]


def run(data: ImageDataset, config: TrainRunConfig, test: ImageDataset | None = None,
        device: torch.device | str = "cpu", progress: bool = False) -> tuple[nn.Module, dict, dict]:
    """Train one model; returns it, its metrics and the metadata its sidecar records."""
    from ..train import TrainConfig, checkpoint_sha256, train_model

    cfg = config
    if cfg.part not in (None, "a", "b"):
        raise MergescopeError(f"part must be a or b, got {cfg.part!r}")
    ids = training_ids(data, cfg)
    model = initial_model(data, cfg, device)
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, augment=cfg.augment,
                       device=str(device), amp=cfg.amp, label_smoothing=cfg.label_smoothing, schedule=cfg.schedule)
    with stage("training"):
        metrics = train_model(model, data, tcfg, eval_ds=test, progress=progress, ids=ids)
    split = {"part": cfg.part, "major": cfg.major, "seed": cfg.split_seed} if cfg.part else None
    meta = {"seed": cfg.seed, "train_config": tcfg.to_dict(), "metrics": metrics, "dataset_fingerprint":
            data.fingerprint, "split": split}
    if cfg.init is not None or cfg.classes is not None or cfg.holdout:  # (a plain run's meta as before)
        meta.update(init=None if cfg.init is None else {"checkpoint": str(cfg.init),
                                                        "sha256": checkpoint_sha256(cfg.init)},
                    classes=None if cfg.classes is None else list(cfg.classes),
                    examples=len(data) if ids is None else len(ids))
    return model, metrics, meta


def run_file(out: str | os.PathLike, data: str, config: TrainRunConfig, *, split: str = "train",
             device: torch.device | str = "cpu", progress: bool = False, overwrite: bool = False,
             options: Mapping | None = None) -> dict:
    """Train one model on ``data`` (``split``) and save it at ``out``; returns its metrics."""
    import sys

    from ..data.open import has_split
    from ..runs.transaction import RunLock, sibling
    from ..train import save_checkpoint
    from ..train.checkpoint import interrupted_write

    mark = since_here()
    out = Path(out)
    if out.exists() and not overwrite:
        if not interrupted_write(out):
            raise MergescopeError(f"--out {out} already exists; pass --overwrite to replace it")
        print(f"note: {out} is the remains of an interrupted write (its sidecar is missing or was written for other "
              "weights); it is written again", file=sys.stderr)
    if config.eval and not has_split(data, "test"):
        raise MergescopeError(f"--eval needs a test split, and --data {data} has none (a folder with test/ or "
                              "*_test.npz beside the training images)")
    images = open_dataset(data, split=split)
    test = open_dataset(data, split="test") if config.eval else None
    with RunLock(sibling(out, "lock"), out):  # a second writer of the same checkpoint is refused in one line
        model, metrics, meta = run(images, config, test, device=device, progress=progress)
        meta.update(dataset=data, config=asdict(config), options=dict(options or {}), time_by_stage=record_since(mark))
        with stage("writing"):
            save_checkpoint(out, model, meta)
    return metrics
