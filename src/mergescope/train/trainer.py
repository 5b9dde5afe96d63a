"""SGD training of a classifier on a mergescope dataset, deterministic given ``TrainConfig.seed``.

Initialisation is the caller's: build the model with ``create_model(name, seed=s, ...)`` (or after
``torch.manual_seed``). ``train_model`` then draws shuffling, augmentation and dropout randomness from
``cfg.seed`` alone, inside ``torch.random.fork_rng`` so the caller's global RNG state is left untouched.
Same initial weights + same config + same device => identical trained weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from mergescope.data import augment_batch, iter_batches, len_batches
from mergescope.errors import DatasetError, MergescopeError, NumericsError
from mergescope.train.evaluation import evaluate_model
from mergescope.train.schedules import get_schedule


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run."""

    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # examples per SGD step
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 penalty, applied to all parameters
    nesterov: bool = True  # Nesterov momentum
    schedule: str = "onecycle"  # lr schedule: onecycle, cosine, step, constant (see list_schedules())
    warmup: float = 0.2  # fraction of all steps spent in linear warmup
    milestones: tuple[float, ...] = (0.5, 0.75)  # "step" schedule: fractions of training where lr *= gamma
    gamma: float = 0.1  # "step" schedule: decay factor per milestone
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    augment: bool = False  # random crop (pad 4) + horizontal flip; only sensible for >= 32 px images
    seed: int = 0  # seeds shuffling, augmentation and dropout (not initialisation)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    amp: bool = False  # bf16 autocast; only takes effect on CUDA
    eval_every: int = 1  # evaluate on eval_ds every N epochs (0: only after the last epoch)
    eval_batch_size: int = 512  # batch size of evaluation passes

    def __post_init__(self) -> None:
        get_schedule(self.schedule)  # raises for an unknown name
        self.milestones = tuple(self.milestones)
        checks = {
            "epochs >= 1": self.epochs >= 1,
            "batch_size >= 1": self.batch_size >= 1,
            "lr > 0": self.lr > 0,
            "0 <= warmup < 1": 0 <= self.warmup < 1,
            "0 <= label_smoothing < 1": 0 <= self.label_smoothing < 1,
            "eval_every >= 0": self.eval_every >= 0,
            "eval_batch_size >= 1": self.eval_batch_size >= 1,
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise MergescopeError(f"invalid TrainConfig: needs {failed[0]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-native dict (tuples as lists) that survives a JSON round trip; ``TrainConfig(**d)`` inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def train_model(
    model: nn.Module,
    train_ds,
    cfg: TrainConfig,
    eval_ds=None,
    progress: bool = True,
    ids: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place with SGD + ``cfg.schedule`` on cross-entropy.

    Args:
        model: an initialised classifier (moved to ``cfg.device``; left in eval mode afterwards).
        train_ds: a mergescope dataset.
        cfg: hyper-parameters.
        eval_ds: optional held-out dataset, evaluated every ``cfg.eval_every`` epochs and at the end.
        progress: show a rich progress bar.
        ids: train on these example ids of ``train_ds`` only (default: all).

    Returns:
        ``{"history": [per-epoch {"epoch", "lr", "train_loss", "train_acc", "seconds"[, "test_loss",
        "test_acc"]}], "steps", "train_seconds", "final_train_loss", "final_train_acc"[, "test_loss",
        "test_acc"]}``; per-epoch train numbers are running averages over the (augmented) batches, the
        final ones a clean eval-mode pass.
    """
    device = torch.device(cfg.device)
    n = len(ids) if ids is not None else len(train_ds)
    if n == 0:
        raise DatasetError("cannot train on an empty dataset")
    drop_last = n > cfg.batch_size  # never a ragged last batch (BatchNorm can't train on one example)
    steps_per_epoch = len_batches(train_ds, cfg.batch_size, ids=ids, drop_last=drop_last)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup * total_steps))
    schedule = get_schedule(cfg.schedule)

    model.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule(step, total_steps, warmup_steps, cfg.milestones, cfg.gamma)
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    generator = torch.Generator().manual_seed(cfg.seed)  # CPU: epoch shuffles + augmentation
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")
    rng_devices = [device.index or 0] if device.type == "cuda" else []

    history: list[dict[str, Any]] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=rng_devices), _progress_bar(progress) as bar:
        torch.manual_seed(cfg.seed)  # dropout and any other global-RNG use during training
        task = bar.add_task("train", total=total_steps, status="")
        for epoch in range(1, cfg.epochs + 1):
            epoch_start = time.perf_counter()
            model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            shuffle_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            batches = iter_batches(
                train_ds, cfg.batch_size, ids=ids, shuffle=True, seed=shuffle_seed, drop_last=drop_last
            )
            for batch in batches:
                x = augment_batch(batch.x, generator) if cfg.augment else batch.x  # [B, C, H, W]
                x, y = x.to(device, non_blocking=True), batch.y.to(device, non_blocking=True)
                with autocast:
                    logits = model(x)  # [B, classes]
                    loss = loss_fn(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(dim=1) == y).sum()
                seen += len(y)
                bar.update(task, advance=1, description=f"epoch {epoch}/{cfg.epochs}")
            train_loss = float(loss_sum) / max(1, seen)
            if not math.isfinite(train_loss):
                raise NumericsError(
                    f"training loss became {train_loss} in epoch {epoch}; try a lower lr (now {cfg.lr})"
                )
            record: dict[str, Any] = {
                "epoch": epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": train_loss,
                "train_acc": int(correct) / max(1, seen),
            }
            last = epoch == cfg.epochs
            if eval_ds is not None and (last or (cfg.eval_every and epoch % cfg.eval_every == 0)):
                record["test_loss"], record["test_acc"] = evaluate_model(model, eval_ds, cfg.eval_batch_size, device)
            record["seconds"] = time.perf_counter() - epoch_start
            history.append(record)
            status = f"loss {train_loss:.3f} acc {record['train_acc']:.3f}"
            if "test_acc" in record:
                status += f" test {record['test_acc']:.3f}"
            bar.update(task, status=status)

    model.eval()
    metrics: dict[str, Any] = {"history": history, "steps": total_steps, "train_seconds": time.perf_counter() - start}
    metrics["final_train_loss"], metrics["final_train_acc"] = evaluate_model(
        model, train_ds, cfg.eval_batch_size, device, ids=ids
    )
    if eval_ds is not None:
        metrics["test_loss"], metrics["test_acc"] = history[-1]["test_loss"], history[-1]["test_acc"]
    return metrics
