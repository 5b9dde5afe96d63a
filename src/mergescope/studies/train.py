"""``mergescope train``: one model trained from the zoo and saved as a checkpoint (safetensors + JSON sidecar) —
also the ``train`` stage of ``mergescope study``.

A model is identified by its architecture, its seed (initialisation and data order) and, for the thesis's
stratified pair (000 App. B), the half of the class split it sees (``part``); same config, same data, same device
→ the same weights.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import ImageDataset, open_dataset, stratified_pair
from ..errors import MergescopeError


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


def run(data: ImageDataset, config: TrainRunConfig, test: ImageDataset | None = None,
        device: torch.device | str = "cpu", progress: bool = False) -> tuple[nn.Module, dict, dict]:
    """Train one model; returns it, its metrics and the metadata its sidecar records."""
    from ..models import create_model
    from ..train import TrainConfig, train_model

    cfg = config
    if cfg.part not in (None, "a", "b"):
        raise MergescopeError(f"part must be a or b, got {cfg.part!r}")
    ids = None
    if cfg.part:
        ids_a, ids_b = stratified_pair(data.targets, major=cfg.major, seed=cfg.split_seed)
        ids = torch.as_tensor(ids_a if cfg.part == "a" else ids_b)
    model = create_model(cfg.arch, seed=cfg.seed, **{"in_channels": data.num_channels,
                                                     "num_classes": len(data.classes), **dict(cfg.arch_kwargs)})
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, augment=cfg.augment,
                       device=str(device), amp=cfg.amp, label_smoothing=cfg.label_smoothing)
    metrics = train_model(model, data, tcfg, eval_ds=test, progress=progress, ids=ids)
    split = {"part": cfg.part, "major": cfg.major, "seed": cfg.split_seed} if cfg.part else None
    meta = {"seed": cfg.seed, "train_config": tcfg.to_dict(), "metrics": metrics, "dataset_fingerprint":
            data.fingerprint, "split": split}
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
        save_checkpoint(out, model, {**meta, "dataset": data, "config": asdict(config), "options": dict(options or {})})
    return metrics
