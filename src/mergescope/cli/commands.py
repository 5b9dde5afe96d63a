"""What each command does: turn the parsed options into a study's inputs and config, run it, print the outcome.

Each function imports its study when called, so building the parser stays free of torch.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .._argtypes import resolve_device
from ..errors import MergescopeError


def _inputs(args: argparse.Namespace, stats_images: bool = True):
    from ..studies.common import StudyInputs

    return StudyInputs(checkpoints=list(args.checkpoints), data=args.data, out=args.out, arch=args.arch,
                       arch_kwargs=args.arch_kwargs, split=args.split,
                       eval_splits=list(getattr(args, "eval_splits", ()) or ()),
                       stats_images=getattr(args, "stats_images", None) if stats_images else None,
                       device=resolve_device(args.device), progress=not args.quiet, overwrite=args.overwrite)


def _options(args: argparse.Namespace) -> dict:
    from .config import resolved_options

    return resolved_options(args)


def _print_outcome(results: dict, run_dir: Path) -> None:
    from ..report import barriers, headline

    print(headline(results["rows"], results["endpoints"]))
    for b in barriers(results["rows"], results["endpoints"]):
        if b["split"] == "test" and not math.isnan(b["midpoint_accuracy"]):
            print(f"  {b['method']:<18} accuracy at α=0.5: {100 * b['midpoint_accuracy']:5.1f}%   "
                  f"loss barrier: {b['loss_barrier']:.3f}")
    print(f"report: {run_dir / 'report.html'}")


def demo(args: argparse.Namespace) -> None:
    from ..studies import demo as study

    cfg = study.DemoConfig(matching=args.matching, epochs=args.epochs)
    results = study.run_folder(args.out, cfg, progress=not args.quiet, overwrite=args.overwrite,
                               device=resolve_device(args.device))
    _print_outcome(results, Path(args.out))


def train(args: argparse.Namespace) -> None:
    import torch

    from ..data import open_dataset, stratified_pair
    from ..data.open import has_split
    from ..models import create_model
    from ..train import TrainConfig, save_checkpoint, train_model

    if Path(args.out).exists() and not args.overwrite:
        raise MergescopeError(f"--out {args.out} already exists; pass --overwrite to replace it")
    if args.eval and not has_split(args.data, "test"):
        raise MergescopeError(f"--eval needs a test split, and --data {args.data} has none (a folder with test/ or "
                              "*_test.npz beside the training images)")
    data = open_dataset(args.data, split=args.split)
    test = open_dataset(args.data, split="test") if args.eval else None
    ids = None
    if args.part:
        ids_a, ids_b = stratified_pair(data.targets, major=args.major, seed=args.split_seed)
        ids = ids_a if args.part == "a" else ids_b
    model = create_model(args.arch, seed=args.seed, **{"in_channels": data.num_channels,
                                                       "num_classes": len(data.classes), **args.arch_kwargs})
    device = resolve_device(args.device)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      augment=args.augment, device=device, amp=args.amp, label_smoothing=args.label_smoothing)
    metrics = train_model(model, data, cfg, eval_ds=test, progress=not args.quiet,
                          ids=None if ids is None else torch.as_tensor(ids))
    split = {"part": args.part, "major": args.major, "seed": args.split_seed} if args.part else None
    save_checkpoint(args.out, model, {"seed": args.seed, "train_config": cfg.to_dict(), "metrics": metrics,
                                      "dataset": args.data, "dataset_fingerprint": data.fingerprint, "split": split,
                                      "options": _options(args)})
    acc = f", test accuracy {100 * metrics['test_acc']:.2f}%" if test is not None else ""
    print(f"saved {args.out}{acc}")


def sweep(args: argparse.Namespace) -> None:
    from ..studies import sweep as study

    cfg = study.SweepConfig(methods=args.methods or study.METHODS, matching=args.matching,
                            batch_size=args.batch_size, match_points=args.match_points)
    result = study.run_folder(_inputs(args), cfg, alpha_step=args.alpha_step, options=_options(args))
    _print_outcome(result.to_json(), Path(args.out))


def merge(args: argparse.Namespace) -> None:
    from ..studies import merge as study

    cfg = study.MergeConfig(methods=args.methods or study.DEFAULT_METHODS, weights=args.weights,
                            matching=args.matching, batch_size=args.batch_size, match_points=args.match_points)
    result = study.run_folder(_inputs(args), cfg, options=_options(args))
    for split, s in result.summary.items():
        print(f"{split}: mean model accuracy {100 * s['mean_endpoint_accuracy']:.1f}%")
        for r in (r for r in result.rows if r["split"] == split):
            print(f"  {r['method']:<20} {100 * r['accuracy']:5.1f}%  ({100 * s['gap'][r['method']]:+.1f} points)")
    print(f"report: {Path(args.out) / 'report.html'}")


def probe(args: argparse.Namespace) -> None:
    from ..studies import probe as study

    layers = args.layers[0] if len(args.layers) == 1 and args.layers[0] in ("conv", "all") else list(args.layers)
    cfg = study.ProbeConfig(k=args.k, reduction=args.reduction, alpha=args.alpha, batch_size=args.batch_size,
                            subset_images=args.subset_images, match_points=args.match_points, matching=args.matching,
                            layers=layers)
    study.run_folder(_inputs(args, stats_images=False), cfg, options=_options(args))
    print(f"report: {Path(args.out) / 'report.html'}")


def compare(args: argparse.Namespace) -> None:
    from ..studies import compare as study

    if len(args.eval_splits) != 1:
        raise MergescopeError(f"compare: --eval-splits takes one split here (partial merging is evaluated on it), "
                              f"got {len(args.eval_splits)}")
    cfg = study.CompareConfig(embedder=args.embedder, clip_model=args.clip_model, clip_weights=args.clip_weights,
                              consensus_metric=args.consensus_metric, threshold=args.threshold,
                              null_quantile=args.null_quantile, null_partners=args.null_partners,
                              partial_merge=args.partial_merge, alpha=args.alpha, eval_split=args.eval_splits[0],
                              seeds=tuple(args.seeds), batch_size=args.batch_size)
    out = study.run_folder(args.run_dir, cfg, device=resolve_device(args.device), progress=not args.quiet,
                           overwrite=args.overwrite, options=_options(args))
    res, run_dir = out.result, Path(args.run_dir)
    print(f"compared {len(res.rows)} channel pairs (δ embedder: {(res.embedder or {}).get('name', 'none')})")
    rule = res.rules["observation3"]
    for r in res.observation3:
        if "share_all similar" not in r:
            continue  # the metric has no null in this layer
        print(f"  {r['layer']:<20} all similar {100 * r['share_all similar']:5.1f}%   most similar "
              f"{100 * r['share_most similar']:5.1f}%   all dissimilar {100 * r['share_all dissimilar']:5.1f}%"
              f"   ({rule['metric']} beyond the unmatched-channel null's {rule['quantile']:g} quantile)")
    if not res.observation3:
        print("  (Observation 3 needs at least two models aligned to the reference)")
    print(f"table: {run_dir / 'compare.csv'}")
    print(f"report: {run_dir / 'report.html'}")


def regress(args: argparse.Namespace) -> None:
    from ..studies import regress as study

    cfg = study.RegressConfig(fit_images=args.fit_images, heldout_images=args.heldout_images, ridge=args.ridge,
                              k=args.k, batch_size=args.batch_size)
    out = study.run_folder(args.run_dir, cfg, device=resolve_device(args.device), progress=not args.quiet,
                           overwrite=args.overwrite, options=_options(args))
    for r in out["summary"]:
        if r["label"] in ("m=1 refit", "all"):
            rec = "—" if r["mean_recovered"] is None else f"{100 * r['mean_recovered']:5.1f}%"
            r2 = "—" if r["mean_r2"] is None else f"{r['mean_r2']:.3f}"
            print(f"  {r['layer']:<20} {r['label']:<10} mean held-out R² {r2}   recovered top-{cfg.k} {rec}")
    info = out["info"]
    print(f"fitted on {info['subset']} images, R² on {info['heldout']} held-out images, top-k among the "
          f"{info['ranked']} images outside the fitting subset")
    run_dir = Path(args.run_dir)
    print(f"table: {run_dir / 'regression.csv'}")
    print(f"report: {run_dir / 'report.html'}")


def report(args: argparse.Namespace) -> None:
    from ..report import render_report
    from ..runs import refresh_hashes

    run_dir = Path(args.run_dir)
    path = run_dir / "results.json"
    if not path.exists():
        raise MergescopeError(f"no results.json in {args.run_dir}: not a finished mergescope run folder")
    results = json.loads(path.read_text())
    written = []
    features = results.get("features")
    if features and (run_dir / "probe").is_dir():
        from ..data import open_dataset
        from ..probe import load_probe
        from ..studies.probe import render_views

        pages = render_views(run_dir, open_dataset(features["data"], split=features["split"]),
                             load_probe(run_dir / "probe"), features["views"])
        written += [run_dir / p["href"] for p in pages]
    if results.get("regression"):
        from ..studies.regress import rerender

        regression = rerender(run_dir, results)
        if regression is None:
            print("note: the regression study has no stored top-k images (regression_topk.json; older studies lack "
                  "it): its pages are left as they are (`mergescope regress RUN_DIR --overwrite` redoes it)",
                  file=sys.stderr)
        written += regression or []
    written.append(render_report(run_dir, results))
    refresh_hashes(run_dir, written)
    print(written[-1])


def layers(args: argparse.Namespace) -> None:
    from ..models import create_model
    from ..perm import build_spec, select_layers
    from ..train import load_checkpoint

    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint, arch=args.arch, arch_kwargs=args.arch_kwargs or None)
    elif args.arch:
        model = create_model(args.arch, **args.arch_kwargs)
    else:
        raise MergescopeError("layers: give --arch NAME or --checkpoint PATH")
    spec = build_spec(model)
    probed = set(select_layers(spec, "conv"))
    for name, tap in spec.layers.items():
        kind = "conv" if tap.spatial else "linear"
        print(f"{name:<32} {tap.channels:>5} channels  {kind:<6} {'probed' if name in probed else '      '}  "
              f"group: {tap.group or '(fixed)'}")
    print(spec.describe())


def methods(args: argparse.Namespace) -> None:
    from ..merge.methods import methods_table

    print(methods_table())
