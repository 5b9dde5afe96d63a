"""What each command does: turn the parsed options into a study's inputs and config, run it, print the outcome.

Each function imports its study when called, so building the parser stays free of torch.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

from .._argtypes import resolve_device
from ..errors import MergescopeError


def _timed(command):
    """``command``, then one line of where its time went (:mod:`mergescope.timing`; its manifest records the same)."""
    @functools.wraps(command)
    def timed_command(args: argparse.Namespace) -> None:
        from ..timing import timed

        with timed() as times:
            command(args)
        print(times.line())
    return timed_command


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


@_timed
def demo(args: argparse.Namespace) -> None:
    from ..studies import demo as study
    from ..studies.study import answers

    cfg = study.DemoConfig(matching=args.matching, match_points=args.match_points, epochs=args.epochs)
    outcome = study.run_folder(args.out, cfg, progress=not args.quiet, overwrite=args.overwrite,
                               device=resolve_device(args.device))
    for line in answers(outcome.root):
        print(line)
    print(f"report: {outcome.report}")


def train_config(args: argparse.Namespace, **override):
    """One model's :class:`~mergescope.studies.train.TrainRunConfig` from the train options."""
    from ..studies.train import TrainRunConfig, parse_classes

    classes = getattr(args, "classes", None)
    fields = dict(arch=args.arch, arch_kwargs=args.arch_kwargs, seed=args.seed, epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, label_smoothing=args.label_smoothing, augment=args.augment,
                  amp=args.amp, eval=args.eval, part=args.part, major=args.major, split_seed=args.split_seed,
                  init=getattr(args, "init", None), classes=None if classes is None else parse_classes(classes))
    return TrainRunConfig(**{**fields, **override})


@_timed
def train(args: argparse.Namespace) -> None:
    from ..studies import train as study

    metrics = study.run_file(args.out, args.data, train_config(args), split=args.split,
                             device=resolve_device(args.device), progress=not args.quiet, overwrite=args.overwrite,
                             options=_options(args))
    acc = f", test accuracy {100 * metrics['test_acc']:.2f}%" if args.eval else ""
    print(f"saved {args.out}{acc}")


def sweep_config(args: argparse.Namespace):
    """The sweep's :class:`~mergescope.studies.sweep.SweepConfig` from its options."""
    from ..merge import alpha_grid
    from ..studies import sweep as study

    return study.SweepConfig(alphas=alpha_grid(args.alpha_step), methods=args.methods or study.METHODS,
                             matching=args.matching, batch_size=args.batch_size, match_points=args.match_points)


@_timed
def sweep(args: argparse.Namespace) -> None:
    from ..studies import sweep as study

    result = study.run_folder(_inputs(args), sweep_config(args), options=_options(args))
    _print_outcome(result.to_json(), Path(args.out))


def merge_config(args: argparse.Namespace):
    """The N-model merge's :class:`~mergescope.studies.merge.MergeConfig` from its options."""
    from ..studies import merge as study

    return study.MergeConfig(methods=args.methods or study.DEFAULT_METHODS, weights=args.weights,
                             matching=args.matching, batch_size=args.batch_size, match_points=args.match_points,
                             base=getattr(args, "base", None), sample_counts=getattr(args, "sample_counts", None),
                             heldout_split=getattr(args, "heldout_split", None))


@_timed
def merge(args: argparse.Namespace) -> None:
    from ..studies import merge as study

    result = study.run_folder(_inputs(args), merge_config(args), options=_options(args))
    for split, s in result.summary.items():
        print(f"{split}: mean model accuracy {100 * s['mean_endpoint_accuracy']:.1f}%")
        for r in (r for r in result.rows if r["split"] == split):
            print(f"  {r['method']:<20} {100 * r['accuracy']:5.1f}%  ({100 * s['gap'][r['method']]:+.1f} points)")
    print(f"report: {Path(args.out) / 'report.html'}")


def probe_config(args: argparse.Namespace):
    """The feature study's :class:`~mergescope.studies.probe.ProbeConfig` from its options."""
    from ..studies import probe as study

    layers = args.layers[0] if len(args.layers) == 1 and args.layers[0] in ("conv", "all") else list(args.layers)
    return study.ProbeConfig(k=args.k, reduction=args.reduction, alpha=args.alpha, batch_size=args.batch_size,
                             subset_images=args.subset_images, match_points=args.match_points,
                             matching=args.matching, layers=layers, precision=args.precision)


@_timed
def probe(args: argparse.Namespace) -> None:
    from ..studies import probe as study

    study.run_folder(_inputs(args, stats_images=False), probe_config(args), options=_options(args))
    print(f"report: {Path(args.out) / 'report.html'}")


def compare_config(args: argparse.Namespace):
    """The channel comparison's :class:`~mergescope.studies.compare.CompareConfig` from its options."""
    from ..studies import compare as study

    if len(args.eval_splits) != 1:
        raise MergescopeError(f"compare: --eval-splits takes one split here (partial merging is evaluated on it), "
                              f"got {len(args.eval_splits)}")
    return study.CompareConfig(embedder=args.embedder, clip_model=args.clip_model, clip_weights=args.clip_weights,
                               consensus_metric=args.consensus_metric, threshold=args.threshold,
                               null_quantile=args.null_quantile, null_partners=args.null_partners,
                               partial_merge=args.partial_merge, alpha=args.alpha,
                               eval_split=args.eval_splits[0], seeds=tuple(args.seeds), batch_size=args.batch_size)


@_timed
def compare(args: argparse.Namespace) -> None:
    from ..studies import compare as study

    cfg = compare_config(args)
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


def regress_config(args: argparse.Namespace):
    """The regression study's :class:`~mergescope.studies.regress.RegressConfig` from its options."""
    from ..studies import regress as study

    return study.RegressConfig(fit_images=args.fit_images, heldout_images=args.heldout_images, ridge=args.ridge,
                               k=args.k, batch_size=args.batch_size)


@_timed
def regress(args: argparse.Namespace) -> None:
    from ..studies import regress as study

    cfg = regress_config(args)
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


@_timed
def report(args: argparse.Namespace) -> None:
    from ..report import render_report
    from ..runs import load_run, refresh_hashes, verify_inputs, write_run

    final = Path(args.run_dir)
    results, manifest = load_run(final)
    verify_inputs(final, manifest)  # pages are made from the stored data only if it is the run's own
    with write_run(final, adds=True) as staging:
        run_dir = staging.path
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
                print("note: the regression study has no stored top-k images (regression_topk.json; older studies "
                      "lack it): its pages are left as they are (`mergescope regress RUN_DIR --overwrite` redoes it)",
                      file=sys.stderr)
            written += regression or []
        written.append(render_report(run_dir, results))
        refresh_hashes(run_dir, written)  # the pages just made from the verified data
    print(final / written[-1].name)


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


@_timed
def study(args: argparse.Namespace) -> None:
    from ..studies import study as engine
    from .parser import build_parser
    from .study import study_config

    cfg = study_config(build_parser(), args)
    start = "train" if args.overwrite and not args.only and not args.start else args.start
    outcome = engine.run_folder(cfg, only=args.only, start=start, progress=not args.quiet)
    for line in engine.answers(outcome.root):
        print(line)
    print(f"report: {outcome.report}")


@_timed
def bench_merge(args: argparse.Namespace) -> None:
    from ..studies import bench_merge as study
    from ..studies.workloads import WorkloadConfig

    train = WorkloadConfig(arch=args.arch, arch_kwargs=args.arch_kwargs, models=args.models, epochs=args.epochs,
                           finetune_epochs=args.finetune_epochs, lr=args.lr, finetune_lr=args.finetune_lr,
                           batch_size=args.train_batch_size, augment=args.augment, holdout=args.holdout)
    cfg = study.BenchConfig(workloads=args.workloads or study.DEFAULT_WORKLOADS,
                            methods=args.methods or study.DEFAULT_METHODS, train=train, matching=args.matching,
                            batch_size=args.batch_size, stats_images=args.stats_images,
                            eval_splits=list(args.eval_splits))
    result = study.run_folder(cfg, args.data, args.out, split=args.split, checkpoints=args.checkpoints,
                              device=resolve_device(args.device), progress=not args.quiet,
                              overwrite=args.overwrite, options=_options(args))
    print(study.format_table(result.rows))
    print(result.reading)
    print(f"table: {Path(args.out) / study.CSV_NAME}")
    print(f"report: {Path(args.out) / 'report.html'}")


def methods(args: argparse.Namespace) -> None:
    from ..merge.methods import methods_table

    print(methods_table())
