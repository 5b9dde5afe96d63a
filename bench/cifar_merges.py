"""Accuracy of every merge method on CIFAR-10: two models at α = 0.5, partial zipping, and N models at once.

What it measures
    N models of one architecture trained from different seeds on the CIFAR-10 training split (random crop + flip,
    one-cycle SGD); checkpoints are kept in --ckpt-dir and reused, so an interrupted run resumes where it stopped.
    Then, with the statistics of --stats-images fixed training images and test accuracy on the 10,000 test images:

    * 2 models (the first two), every method of ``mergescope.studies.merge`` (all into model 0's space, weights ½, ½):
      naive, permuted (activation matching), CCA, OT, regression, ZipIt! — each plain, + REPAIR (towards the
      mapped endpoints' statistics) and + RESET;
    * partial zipping of the same two: zipped up to each layer, both models' own layers after it (+ RESET);
    * N models (all of them, equal weights): every method but ZipIt! (two models only).

    Every merged model of one table shares one matching pass, one feature-statistics pass, one REPAIR/RESET pass
    and one evaluation pass (``mergescope.studies.merge.run``).

Baseline / goals (issue 5)
    permutation + REPAIR on the same models in the same run. Goals: the best map-based merge beats it at the
    midpoint (2 models), and the best merge of N = 5 models loses < 5 points to the mean endpoint accuracy.
    Published anchors (other data / recipes; ../shared/datasets/README.md has this data's H100 baseline):
    VGG11 (BN) permuted + REPAIR 85.4 % from ends 89.2 / 88.7, ResNet20×4 87.6 % from 91.6 / 91.6.

Run
    python bench/cifar_merges.py                                   # VGG11-BN ×¼, 5 models, 6 epochs: CPU scale
    python bench/cifar_merges.py --arch resnet20 --width 4 --epochs 60 --device cuda --amp --stats-images 50000
    python bench/cifar_merges.py --arch vgg11_bn --width 1 --epochs 60 --device cuda --amp --stats-images 50000
    python bench/cifar_merges.py --data digits --arch cnn_digits --width 16 --epochs 6 --lr 0.05 --batch-size 64 \
        --no-augment --stats-images 2000                           # the same harness on the digits, ~2 min
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared 2-core machines: no spinning OpenMP threads

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from mergescope.align import group_covariances
from mergescope.data import iter_batches, len_batches, open_dataset
from mergescope.evaluate import evaluate_models
from mergescope.studies.merge import MergeConfig
from mergescope.studies.merge import run as merge_study
from mergescope.merge import repair_many, zipit_merge
from mergescope.merge.recipes import BASES, FIXES
from mergescope.models import create_model
from mergescope.perm import build_spec
from mergescope.train import TrainConfig, load_checkpoint, save_checkpoint, train_model

ROOT = Path(__file__).resolve().parents[1]


def trained_models(args, train, test) -> list[torch.nn.Module]:
    """Train (or load, if its checkpoint exists) one model per seed."""
    models = []
    for seed in range(args.models):
        extra = "".join(f"_{k}{v}" for k, v in sorted(args.arch_kwargs.items()))
        path = Path(args.ckpt_dir) / f"{args.arch}_w{args.width:g}{extra}_e{args.epochs}_s{seed}.safetensors"
        if path.exists():
            model, meta = load_checkpoint(path, device=args.device)
            print(f"loaded {path.name}: test accuracy {100 * meta['metrics']['test_acc']:.2f}%", flush=True)
        else:
            width = int(args.width) if args.width.is_integer() else args.width
            model = create_model(args.arch, width=width, seed=seed, in_channels=train.num_channels,
                                 num_classes=len(train.classes), **args.arch_kwargs)
            cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
                              augment=not args.no_augment,
                              device=args.device, amp=args.amp, eval_every=0)
            t0 = time.perf_counter()
            metrics = train_model(model, train, cfg, eval_ds=test, progress=not args.quiet)
            save_checkpoint(path, model, {"seed": seed, "train_config": cfg.to_dict(), "metrics": metrics})
            print(f"trained {path.name} in {time.perf_counter() - t0:.0f} s: test accuracy "
                  f"{100 * metrics['test_acc']:.2f}%", flush=True)
        models.append(model.to(args.device).eval())
    return models


def partial_zips(models, train, test, ids, args) -> list[dict]:
    """Test accuracy of A and B zipped up to each layer (plain and + RESET), in one RESET and one evaluation pass."""
    a, b = models[:2]
    spec = build_spec(a)

    def batches():
        return iter_batches(train, args.eval_batch_size, ids=ids)

    [stats] = group_covariances(a, [b], spec, batches(), device=args.device)
    plain = {layer: zipit_merge(a, b, None, spec, stats=stats, up_to=layer).model.to(args.device)
             for layer in spec.layers}
    reset = {layer: copy.deepcopy(m) for layer, m in plain.items()}
    repair_many([a, b], spec, batches(), reset=list(reset.values()), device=args.device,
                total=len_batches(train, args.eval_batch_size, ids=ids))
    nets = {f"{k}|plain": m for k, m in plain.items()} | {f"{k}|reset": m for k, m in reset.items()}
    nets["ensemble"] = _Ensemble(a, b)
    scores = evaluate_models(nets, iter_batches(test, args.eval_batch_size), device=args.device)
    params = sum(p.numel() for p in a.parameters())
    rows = []
    for layer in spec.layers:
        used = _used_params(plain[layer])
        rows.append({"up_to": layer, "plain": scores[f"{layer}|plain"]["accuracy"],
                     "reset": scores[f"{layer}|reset"]["accuracy"], "params_ratio": used / params})
    rows.append({"up_to": "(none: ensemble)", "plain": scores["ensemble"]["accuracy"],
                 "reset": scores["ensemble"]["accuracy"], "params_ratio": 2.0})
    return rows


class _Ensemble(torch.nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return 0.5 * self.a(x) + 0.5 * self.b(x)


def _used_params(gm) -> int:
    """Parameters of the modules a partially zipped graph actually calls (trunk once, heads twice)."""
    seen = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            seen[node.target] = sum(p.numel() for p in gm.get_submodule(node.target).parameters(recurse=False))
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    p.add_argument("--arch", default="vgg11_bn")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--arch-kwargs", type=json.loads, default={}, help='more model arguments, e.g. \'{"batchnorm": false}\'')
    p.add_argument("--models", type=int, default=5)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--stats-images", type=int, default=5000, help="training images for all statistics")
    p.add_argument("--ckpt-dir", default=str(ROOT / "bench" / "checkpoints"))
    p.add_argument("--cache-dir", default=str(ROOT / "bench" / "cache"), help="decoded JPEG packs (.npy)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for training (CUDA)")
    p.add_argument("--no-partial", action="store_true", help="skip the partial-zipping curve")
    p.add_argument("--no-augment", action="store_true", help="no random crop + flip (e.g. for the 8×8 digits)")
    p.add_argument("--out", help="write every number as JSON here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    kw = {} if args.data == "digits" else {"cache_dir": args.cache_dir}
    train, test = open_dataset(args.data, "train", **kw), open_dataset(args.data, "test", **kw)
    models = trained_models(args, train, test)
    ids = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.stats_images].sort().values
    common = dict(batch_size=args.eval_batch_size, stats_ids=ids.tolist())
    run_on = dict(device=args.device, progress=not args.quiet)
    t0 = time.perf_counter()
    two = merge_study(models[:2], train, {"test": test}, MergeConfig([b + f for b in BASES for f in FIXES], **common),
                      **run_on)
    t_two = time.perf_counter() - t0
    partial = [] if args.no_partial else partial_zips(models, train, test, ids, args)
    many = None
    if args.models > 2:
        t0 = time.perf_counter()
        many = merge_study(models, train, {"test": test},
                           MergeConfig([b + f for b in BASES if b != "zipit" for f in FIXES], **common), **run_on)
        t_many = time.perf_counter() - t0

    print(f"\n{args.arch} width {args.width:g}, {args.epochs} epochs, statistics on {args.stats_images} training "
          f"images, {args.device}; test accuracy (%)")
    ends = [100 * e["accuracy"] for e in (many or two).endpoints]
    print("endpoints: " + ", ".join(f"{a:.2f}" for a in ends) + f" (mean {sum(ends) / len(ends):.2f})")
    for name, res, secs in (("2 models", two, t_two),) + ((("%d models" % args.models, many, t_many),) if many else ()):
        acc = {r["method"]: 100 * r["accuracy"] for r in res.rows}
        mean = 100 * res.summary["test"]["mean_endpoint_accuracy"]
        print(f"\n{name} (mean endpoint {mean:.2f}; {secs:.0f} s, passes {res.passes})")
        bases = [b for b in BASES if any(m.startswith(b) for m in acc)]
        wb, wf = max(map(len, bases)) + 2, max(map(len, FIXES)) + 2
        print(f"{'base':<{wb}}" + "".join(f"{'+' + f[1:] if f else 'plain':>{wf}}" for f in FIXES))
        for b in bases:
            print(f"{b:<{wb}}" + "".join(f"{acc[b + f]:>{wf}.2f}" if b + f in acc else f"{'—':>{wf}}" for f in FIXES))
        base = acc["permuted+repair"]
        maps = {m: a for m, a in acc.items() if not m.startswith(("naive", "permuted", "mergemany"))}
        best_map = max(maps, key=maps.get)
        best = max(acc, key=acc.get)
        print(f"best map-based: {best_map} {maps[best_map]:.2f} vs permuted+repair {base:.2f} "
              f"({maps[best_map] - base:+.2f} points); best overall {best} {acc[best]:.2f}, "
              f"{acc[best] - mean:+.2f} points vs the mean endpoint")
    if partial:
        print("\npartial zipping of models 0 and 1 (test accuracy %; parameters relative to one model)")
        print(f"{'zipped up to':<20}{'plain':>8}{'+reset':>8}{'params':>8}")
        for r in partial:
            print(f"{r['up_to']:<20}{100 * r['plain']:>8.2f}{100 * r['reset']:>8.2f}{r['params_ratio']:>8.2f}")
    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f} s; load average at end: {os.getloadavg()[0]:.1f}")
    if args.out:
        record = {"args": vars(args), "two": two.to_json(), "many": many.to_json() if many else None,
                  "partial_zip": partial, "seconds": total}
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
