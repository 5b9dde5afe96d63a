"""The survey's three families on one harness (issue 13): ``mergescope bench-merge``'s table on real CIFAR-10,
sized for a CPU.

What it measures
    The workloads of ``mergescope.studies.workloads`` trained with mergescope's own trainer on a stratified subset
    of the CIFAR-10 training split (--train-images, of which --holdout are held out for the greedy soup), scored
    on a stratified subset of the test split (--test-images): jointly and on the test images of each half of the
    classes (0-4 = airplane..deer, 5-9 = dog..truck; ZipIt!'s per-task accuracy). Every method of --methods on
    every workload, one merge plan and one per-class evaluation pass per workload
    (``mergescope.studies.bench_merge.run``): accuracy, loss, the data passes each method needs on its own, its own
    seconds, BatchNorm treatment, family, parameters and forward passes (an ensemble of N runs N models).
    Checkpoints are kept in --checkpoints and reused by a rerun of the same configuration.

Anchors (printed beside the table; other scale, other recipes)
    ZipIt! (Stoica et al. 2024, Table 1a), CIFAR-10 5+5, ResNet20×4, joint accuracy: weight averaging 43.0%,
    Git Re-Basin permute 58.4%, ZipIt!(20/20) 79.0%, ensemble ≈87%. REPAIR (Jordan et al. 2023), CIFAR-10
    ResNet20×4 two seeds: endpoints 95.4 / 95.1%, permute + REPAIR 90.3% at the midpoint.

Run
    nice -n 10 python bench/bench_merge.py --data ../shared/datasets/cifar10 --out /tmp/bench_merge   # ≤ 15 min, CPU
    python bench/bench_merge.py --data ../shared/datasets/cifar10 --width 4 --train-images 50000 --test-images 10000 \\
        --epochs 60 --finetune-epochs 10 --augment --stats-images 5000 --workloads seeds halves halves_finetune \\
        stratified_finetune hparams checkpoints --device cuda --out /tmp/bench_merge_full   # the full one, on a GPU
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared 2-core machines: no spinning OpenMP threads

import argparse
import json
import time
from pathlib import Path

import torch

from mergescope.data import open_dataset
from mergescope.data.memory import InMemoryDataset
from mergescope.data.splits import stratified_subset
from mergescope.runs.csvio import write_rows
from mergescope.studies.bench_merge import CSV_COLUMNS, BenchConfig, format_table, run
from mergescope.studies.workloads import WorkloadConfig

METHODS = ("logit_ensemble", "prob_ensemble", "naive", "swa", "greedy_soup", "task_arithmetic", "ties", "dare",
           "fisher", "regmean", "permuted", "permuted+repair", "permuted+reset", "zipit+repair", "permuted>ties")
ANCHORS = {  # workload -> method -> the published number of the comparable setting
    "halves": {"naive": "ZipIt! 5+5 R20×4 weight avg 43.0%", "permuted": "ZipIt! 5+5 R20×4 permute 58.4%",
               "zipit+repair": "ZipIt! 5+5 R20×4 ZipIt!(20/20) 79.0%", "logit_ensemble": "ZipIt! ensemble ≈87%",
               "prob_ensemble": "ZipIt! ensemble ≈87%"},
    "seeds": {"permuted+repair": "REPAIR R20×4 90.3% (ends 95.4/95.1)"},
}


def subset(ds: InMemoryDataset, n: int, seed: int = 0) -> InMemoryDataset:
    """``n`` images of ``ds`` spread evenly over the classes (all of them when n ≥ len(ds))."""
    if n >= len(ds):
        return ds
    ids = torch.as_tensor(stratified_subset(ds.targets, n, seed=seed))
    return InMemoryDataset(ds.images[ids], ds.targets[ids.numpy()], ds.classes, ds.mean, ds.std,
                           name=f"{ds.name}[{n}]")


def markdown(rows: list[dict], anchors: dict) -> str:
    """One markdown table per workload (test split), anchors beside the methods they belong to."""
    pct = lambda v: f"{100 * v:.1f}" if isinstance(v, float) and v == v else "—"  # noqa: E731
    out = []
    for w in dict.fromkeys(r["workload"] for r in rows):
        out += [f"**{w}**", "", "| method | family | BN | acc | 0-4 | 5-9 | passes | held-out | s | fwd | anchor |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in (r for r in rows if r["workload"] == w):
            note = anchors.get(w, {}).get(r["method"], "") or (r["note"] or "")
            cell = {k: "—" if r.get(k) is None else r[k] for k in ("data_passes", "heldout_passes", "forward_passes")}
            sec = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "—"
            out.append(f"| {r['method']} | {r['family']} | {r['batchnorm'] or ''} | {pct(r['accuracy'])} | "
                       f"{pct(r['accuracy_a'])} | {pct(r['accuracy_b'])} | {cell['data_passes']} | "
                       f"{cell['heldout_passes']} | {sec} | {cell['forward_passes']} | {note} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="CIFAR-10: the pack folder (../shared/datasets/cifar10), a pack, "
                   "cifar10:ROOT or an ImageFolder tree")
    p.add_argument("--out", required=True, help="folder for bench.csv, bench.json and checkpoints/")
    p.add_argument("--checkpoints", help="where the workloads' models are trained and reused (default OUT/checkpoints)")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--train-images", type=int, default=1500)
    p.add_argument("--test-images", type=int, default=500)
    p.add_argument("--holdout", type=int, default=150)
    p.add_argument("--models", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--finetune-lr", type=float, default=0.02)
    p.add_argument("--train-batch-size", type=int, default=64, help="images per SGD step")
    p.add_argument("--augment", action="store_true")
    p.add_argument("--stats-images", type=int, default=500)
    p.add_argument("--fisher-examples", type=int, default=256, help="images per model for its Fisher (the registry's "
                   "default 4096 costs a per-example backward pass each)")
    p.add_argument("--workloads", nargs="+", default=["seeds", "halves", "halves_finetune", "checkpoints"])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    start = time.perf_counter()
    train = subset(open_dataset(args.data, split="train"), args.train_images)
    test = subset(open_dataset(args.data, split="test"), args.test_images)
    wcfg = WorkloadConfig(arch=args.arch, arch_kwargs={"width": args.width}, models=args.models, epochs=args.epochs,
                          finetune_epochs=args.finetune_epochs, lr=args.lr, finetune_lr=args.finetune_lr,
                          batch_size=args.train_batch_size, augment=args.augment, holdout=args.holdout)
    cfg = BenchConfig(workloads=args.workloads, methods=args.methods, train=wcfg, stats_images=args.stats_images,
                      params={"fisher": {"examples": args.fisher_examples}})
    out = Path(args.out)
    result = run(cfg, train, {"test": test}, Path(args.checkpoints) if args.checkpoints else out / "checkpoints",
                 device=args.device)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    write_rows(out / "bench.csv", CSV_COLUMNS, result.rows)
    (out / "bench.json").write_text(json.dumps({"args": vars(args), "seconds": seconds, **result.to_json()},
                                               indent=1, default=str))
    for w in dict.fromkeys(r["workload"] for r in result.rows):
        print(format_table([r for r in result.rows if r["workload"] == w], ANCHORS.get(w)))
        print(f"  shared passes: {result.workloads[w]['passes']}")
    print(result.reading)
    print(markdown(result.rows, ANCHORS))
    print(f"{seconds:.0f} s end to end ({len(train)} training images, {len(test)} test images, {args.arch} "
          f"width {args.width}, on {args.device})")


if __name__ == "__main__":
    main()
