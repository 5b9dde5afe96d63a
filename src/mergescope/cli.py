"""The command line: every command is a thin call of the public Python API.

    mergescope demo [--out DIR]                      the whole study on the embedded digits, with a report
    mergescope train --arch NAME --data SPEC --out CKPT [--seed S] [--epochs N] [--part a|b]
    mergescope sweep CKPT_A CKPT_B --data SPEC --out DIR [--matching activation|weight] [--methods ...]
    mergescope merge CKPT_0 CKPT_1 [CKPT ...] --data SPEC --out DIR [--methods ...]
                                                     N models into one with every method, each evaluated
    mergescope probe CKPT_A CKPT_B [CKPT ...] --data SPEC --out DIR [--merge ALPHA]
                                                     top-k images of every channel, models aligned to the first
    mergescope compare RUN_DIR [--embedder clip|fallback] [--clip-weights PATH] [--threshold T] [--partial-merge]
                                                     τ, δ, overlap, correlation per channel pair; Observations 2, 3
    mergescope regress RUN_DIR [--ridge L] [--k K]   A's channels as (sparse) linear maps of B's: R², recovered top-k
    mergescope report RUN_DIR                        re-render report.html (and feature pages) from stored results
    mergescope layers --arch NAME | --checkpoint CKPT   the observable layers and permutation groups
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a loaded machine spinning threads fight for the cores and
# 2-thread torch runs 2-5x slower. libgomp reads this when torch loads it, so it is set before torch is imported
# (the package's __init__ imports nothing heavy); a user's own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from . import _argtypes as T
from .errors import MergescopeError


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=T.device, default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_merge_data(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that merge and evaluate (sweep, merge)."""
    p.add_argument("--batch-size", type=T.positive_int, default=500)
    p.add_argument("--stats-split", default="train", help="split for matching, feature and REPAIR statistics")
    p.add_argument("--stats-images", type=T.positive_int, help="use this many (random, fixed) images for statistics")
    p.add_argument("--eval-splits", nargs="+", default=["test"])
    p.add_argument("--overwrite", action="store_true")
    _add_match_points(p)
    _add_device(p)


def _add_match_points(p: argparse.ArgumentParser) -> None:
    p.add_argument("--match-points", choices=("stage_end", "all"), default="stage_end",
                   help="where a residual stream is measured for matching and joint statistics: its stage's last "
                   "block output (default, as REPAIR's reference) or the average over every place it is seen")


def _methods_help(default: str, exclude: tuple[str, ...] = ()) -> str:
    """The --methods help, from the method names the library knows (merge.recipes)."""
    from .merge.recipes import BASES, FIXES

    bases = " ".join(b + (" (two models)" if b == "zipit" else "") for b in BASES if b not in exclude)
    fixes = ", ".join(f for f in FIXES if f)
    return f"default: {default}; any of the bases {bases}, alone or with {fixes} (e.g. cca+repair)"


def _stats_ids(n_images: int, wanted: int | None) -> list[int] | None:
    """``wanted`` fixed random image ids (seed 0), sorted; None (all images) when not fewer than all."""
    if not wanted or wanted >= n_images:
        return None
    return sorted(torch.randperm(n_images, generator=torch.Generator().manual_seed(0))[:wanted].tolist())


def _cmd_demo(args) -> None:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(matching=args.matching, epochs=args.epochs)
    results = run_demo(args.out, cfg, progress=not args.quiet, overwrite=args.overwrite)
    _print_outcome(results, Path(args.out))


def _print_outcome(results: dict, run_dir: Path) -> None:
    from .report import barriers, headline

    print(headline(results["rows"], results["endpoints"]))
    for b in barriers(results["rows"], results["endpoints"]):
        if b["split"] == "test" and not math.isnan(b["midpoint_accuracy"]):
            print(f"  {b['method']:<18} accuracy at α=0.5: {100 * b['midpoint_accuracy']:5.1f}%   "
                  f"loss barrier: {b['loss_barrier']:.3f}")
    print(f"report: {run_dir / 'report.html'}")


def _cmd_train(args) -> None:
    from .data import open_dataset, stratified_pair
    from .data.open import has_split
    from .models import create_model
    from .train import TrainConfig, save_checkpoint, train_model

    if Path(args.out).exists() and not args.overwrite:
        raise MergescopeError(f"--out {args.out} already exists; pass --overwrite to replace it")
    if args.eval and not has_split(args.data, "test"):
        raise MergescopeError(f"--eval needs a test split, and --data {args.data} has none (a folder with test/ or "
                              "*_test.npz beside the training images)")
    train = open_dataset(args.data, split="train")
    test = open_dataset(args.data, split="test") if args.eval else None
    ids = None
    if args.part:
        ids_a, ids_b = stratified_pair(train.targets, major=args.major, seed=args.split_seed)
        ids = ids_a if args.part == "a" else ids_b
    model = create_model(args.arch, seed=args.seed, **{"in_channels": train.num_channels,
                                                       "num_classes": len(train.classes), **args.arch_kwargs})
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      augment=args.augment, device=args.device, amp=args.amp, label_smoothing=args.label_smoothing)
    metrics = train_model(model, train, cfg, eval_ds=test, progress=not args.quiet,
                          ids=None if ids is None else torch.as_tensor(ids))
    split = {"part": args.part, "major": args.major, "seed": args.split_seed} if args.part else None
    save_checkpoint(args.out, model, {"seed": args.seed, "train_config": cfg.to_dict(), "metrics": metrics,
                                      "dataset": args.data, "dataset_fingerprint": train.fingerprint, "split": split})
    acc = f", test accuracy {100 * metrics['test_acc']:.2f}%" if test is not None else ""
    print(f"saved {args.out}{acc}")


def _cmd_sweep(args) -> None:
    from .data import open_dataset
    from .merge import alpha_grid
    from .models import check_input_fits
    from .runs import prepare_run_dir, write_manifest
    from .sweep import METHODS, SweepConfig, check_same_architecture, run_sweep, save_sweep
    from .train import load_checkpoint

    model_a, meta_a = load_checkpoint(args.model_a, device=args.device)
    model_b, meta_b = load_checkpoint(args.model_b, device=args.device)
    check_same_architecture(model_a, model_b)
    train = open_dataset(args.data, split=args.stats_split)
    check_input_fits(model_a, train, f"checkpoint {args.model_a}")
    evals = {s: open_dataset(args.data, split=s) for s in args.eval_splits}
    run_dir = prepare_run_dir(args.out, overwrite=args.overwrite)  # only once every input is known to be good
    stats_ids = _stats_ids(len(train), args.stats_images)
    cfg = SweepConfig(alphas=alpha_grid(args.alpha_step), methods=args.methods or METHODS,
                      matching=args.matching, batch_size=args.batch_size, stats_ids=stats_ids,
                      match_points=args.match_points)
    start = time.perf_counter()
    result = run_sweep(model_a, model_b, train, evals, cfg, device=args.device, progress=not args.quiet)
    summary = {"model A": str(args.model_a), "model B": str(args.model_b), "dataset": args.data,
               "matching": args.matching, "data passes": result.passes,
               "runtime": f"{time.perf_counter() - start:.1f} s on {args.device}"}
    files = save_sweep(run_dir, result, f"mergescope sweep: {Path(args.model_a).name} × {Path(args.model_b).name}",
                       summary)
    write_manifest(run_dir, {"sweep": dataclasses.asdict(cfg), "data": args.data,
                             "checkpoints": [str(args.model_a), str(args.model_b)]}, files,
                   models={"A": meta_a, "B": meta_b}, timings=result.timings,
                   dataset={"name": train.name, "fingerprint": train.fingerprint})
    _print_outcome(result.to_json(), run_dir)


def _cmd_merge(args) -> None:
    from .data import open_dataset
    from .many import DEFAULT_METHODS, merge_many, save_many
    from .models import check_input_fits
    from .runs import prepare_run_dir, write_manifest
    from .sweep import check_same_architecture
    from .train import load_checkpoint

    loaded = [load_checkpoint(c, device=args.device) for c in args.checkpoints]
    for model, _ in loaded[1:]:
        check_same_architecture(loaded[0][0], model)
    train = open_dataset(args.data, split=args.stats_split)
    check_input_fits(loaded[0][0], train, f"checkpoint {args.checkpoints[0]}")
    evals = {s: open_dataset(args.data, split=s) for s in args.eval_splits}
    run_dir = prepare_run_dir(args.out, overwrite=args.overwrite)
    stats_ids = _stats_ids(len(train), args.stats_images)
    methods = args.methods or DEFAULT_METHODS
    start = time.perf_counter()
    result = merge_many([m for m, _ in loaded], train, evals, methods, args.batch_size, stats_ids,
                        device=args.device, progress=not args.quiet, match_points=args.match_points)
    summary = {"models": [str(c) for c in args.checkpoints], "dataset": args.data, "data passes": result.passes,
               "runtime": f"{time.perf_counter() - start:.1f} s on {args.device}"}
    files = save_many(run_dir, result, f"mergescope merge: {len(loaded)} models", summary)
    write_manifest(run_dir, {"merge": {"methods": list(methods), "batch_size": args.batch_size,
                                       "stats_ids": stats_ids, "match_points": args.match_points}, "data": args.data,
                             "checkpoints": [str(c) for c in args.checkpoints]}, files,
                   models={str(k): meta for k, (_, meta) in enumerate(loaded)}, timings=result.timings,
                   dataset={"name": train.name, "fingerprint": train.fingerprint})
    for split, s in result.summary.items():
        print(f"{split}: mean model accuracy {100 * s['mean_endpoint_accuracy']:.1f}%")
        for r in (r for r in result.rows if r["split"] == split):
            print(f"  {r['method']:<20} {100 * r['accuracy']:5.1f}%  ({100 * s['gap'][r['method']]:+.1f} points)")
    print(f"report: {run_dir / 'report.html'}")


def _cmd_probe(args) -> None:
    from .features import ProbeConfig, probe_run

    cfg = ProbeConfig(split=args.split, k=args.k, reduction=args.reduction, merge=args.merge,
                      batch_size=args.batch_size, subset_images=args.subset_images, match_points=args.match_points)
    probe_run(args.out, args.checkpoints, args.data, cfg, device=args.device, progress=not args.quiet,
              overwrite=args.overwrite)
    print(f"report: {Path(args.out) / 'report.html'}")


def _cmd_compare(args) -> None:
    from .comparison import CompareConfig, compare_run

    cfg = CompareConfig(embedder=args.embedder, clip_model=args.clip_model, clip_weights=args.clip_weights,
                        consensus_metric=args.consensus_metric, threshold=args.threshold,
                        null_quantile=args.null_quantile, null_partners=args.null_partners,
                        partial_merge=args.partial_merge, alpha=args.alpha, eval_split=args.eval_split,
                        seeds=tuple(args.seeds), batch_size=args.batch_size)
    out = compare_run(args.run_dir, cfg, device=args.device, progress=not args.quiet, overwrite=args.overwrite)
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


def _cmd_regress(args) -> None:
    from .regression_run import RegressConfig, regress_run

    cfg = RegressConfig(fit_images=args.fit_images, heldout_images=args.heldout_images, ridge=args.ridge, k=args.k,
                        batch_size=args.batch_size)
    out = regress_run(args.run_dir, cfg, device=args.device, progress=not args.quiet, overwrite=args.overwrite)
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


def _cmd_report(args) -> None:
    from .report import render_report
    from .runs import refresh_hashes

    run_dir = Path(args.run_dir)
    path = run_dir / "results.json"
    if not path.exists():
        raise MergescopeError(f"no results.json in {args.run_dir}: not a finished mergescope run folder")
    results = json.loads(path.read_text())
    written = []
    features = results.get("features")
    if features and (run_dir / "probe").is_dir():
        from .data import open_dataset
        from .features import render_views
        from .probe import load_probe

        pages = render_views(run_dir, open_dataset(features["data"], split=features["split"]),
                             load_probe(run_dir / "probe"), features["views"])
        written += [run_dir / p["href"] for p in pages]
    if results.get("regression"):
        from .regression_run import rerender_regression

        regression = rerender_regression(run_dir, results)
        if regression is None:
            print("note: the regression study has no stored top-k images (regression_topk.json; older studies lack "
                  "it): its pages are left as they are (`mergescope regress RUN_DIR --overwrite` redoes it)",
                  file=sys.stderr)
        written += regression or []
    written.append(render_report(run_dir, results))
    refresh_hashes(run_dir, written)
    print(written[-1])


def _cmd_layers(args) -> None:
    from .models import create_model
    from .perm import build_spec
    from .train import load_checkpoint

    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
    elif args.arch:
        model = create_model(args.arch)
    else:
        raise MergescopeError("give --arch NAME or --checkpoint PATH")
    spec = build_spec(model)
    for name, tap in spec.layers.items():
        print(f"{name:<32} {tap.channels:>5} channels   group: {tap.group or '(fixed)'}")
    print(spec.describe())


def build_parser() -> argparse.ArgumentParser:
    parser = T.OneLineParser(prog="mergescope", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train two digit CNNs, align, merge, repair, report (about a minute on a CPU)")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--matching", choices=("activation", "weight"), default="activation")
    p.add_argument("--epochs", type=T.positive_int, default=6)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="train one model and save it as safetensors + JSON sidecar")
    p.add_argument("--arch", required=True, help="zoo name (see `mergescope layers`), e.g. resnet20")
    p.add_argument("--arch-kwargs", type=T.json_object, default={}, help='JSON, e.g. \'{"width": 4}\'')
    p.add_argument("--data", required=True, help="digits | cifar10:ROOT | PACK.npz | pack folder | ImageFolder tree")
    p.add_argument("--out", required=True, help="checkpoint path (*.safetensors)")
    p.add_argument("--seed", type=T.seed, default=0)
    p.add_argument("--epochs", type=T.positive_int, default=10)
    p.add_argument("--batch-size", type=T.positive_int, default=128)
    p.add_argument("--lr", type=T.positive_float, default=0.1)
    p.add_argument("--label-smoothing", type=T.unit_float, default=0.0)
    p.add_argument("--augment", action="store_true", help="random crop + flip (32 px and larger images)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--eval", action="store_true", help="evaluate on the test split after training")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    p.add_argument("--part", choices=("a", "b"), help="train on one half of the 'stratified' class split")
    p.add_argument("--major", type=T.unit_float, default=0.8, help="stratified split: share of the first half of classes")
    p.add_argument("--split-seed", type=T.seed, default=0)
    _add_device(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sweep", help="align two checkpoints, merge along α with every method, evaluate, report")
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--matching", choices=("activation", "weight"), default="activation")
    p.add_argument("--methods", nargs="+", help=_methods_help("naive permuted permuted+repair permuted+reset",
                                                              exclude=("zipit", "mergemany")))
    p.add_argument("--alpha-step", type=T.alpha_step, default=0.05)
    _add_merge_data(p)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("merge", help="merge two or more models into one with every method (all into the first "
                       "one's channel space, equal weights) and evaluate each merge")
    p.add_argument("checkpoints", nargs="+", help="two or more checkpoints of one architecture; the first is the "
                   "reference")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--methods", nargs="+", help=_methods_help("naive permuted permuted+repair permuted+reset "
                                                              "cca+repair ot+repair regression+repair"))
    _add_merge_data(p)
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("probe", help="top-k images of every channel of every layer, models aligned to the first")
    p.add_argument("checkpoints", nargs="+", help="reference model first, then the models to align to it")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train", help="which images to rank (default: train)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--k", type=T.positive_int, default=10, help="images per channel")
    p.add_argument("--reduction", choices=("max", "mean"), default="max", help="feature map -> one number per image")
    p.add_argument("--merge", type=T.unit_float, metavar="ALPHA", help="also probe A and B merged at ALPHA (permuted, "
                   "permuted + REPAIR, direct average)")
    p.add_argument("--batch-size", type=T.positive_int, default=256)
    p.add_argument("--subset-images", type=T.positive_int, default=5000, metavar="N", help="D′, the fixed subset whose "
                   "activations the probe keeps for Kendall's τ: N images spread evenly over the classes, capped by "
                   "the dataset (default 5000, the thesis's subset size; N ≥ 1)")
    p.add_argument("--overwrite", action="store_true")
    _add_match_points(p)
    _add_device(p)
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("compare", help="compare every channel of the reference with the aligned models' "
                       "(τ, δ, overlap, correlation; Observations 2 and 3; partial merging) over a probe/demo run")
    p.add_argument("run_dir", help="a run folder made by `mergescope probe` or `mergescope demo`")
    p.add_argument("--embedder", choices=("clip", "fallback"),
                   help="image embedder for δ (default: clip with --clip-weights, else the fallback: penultimate "
                        "features of model A, labelled 'fallback', never CLIP)")
    p.add_argument("--clip-weights", help="local CLIP weights file for open_clip (or a tag in its cache)")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name (default: ViT-B-32; OpenAI "
                   "weights from a file need ViT-B-32-quickgelu)")
    p.add_argument("--null-quantile", type=T.unit_float, default=0.95, help="similar = beyond this quantile of the "
                   "metric between unmatched channels of the layer (lower tail for clip_delta); default 0.95")
    p.add_argument("--null-partners", type=T.positive_int, default=32, help="unmatched partners sampled per channel for "
                   "that null (seeded; all of them in smaller layers); default 32")
    p.add_argument("--threshold", type=T.finite_float, default=0.5, help="Observation 3's named variant "
                   "'fixed_threshold': similar when the consensus metric is >= this (<= for clip_delta); default 0.5")
    p.add_argument("--consensus-metric", choices=("kendall_tau", "overlap", "correlation", "clip_delta"),
                   default="kendall_tau", help="metric whose null judgement decides Observations 2 and 3 "
                   "(default: kendall_tau)")
    p.add_argument("--partial-merge", action="store_true", help="also merge only the top/bottom x%% channels by "
                   "each metric (vs random channels) and plot accuracy curves")
    p.add_argument("--alpha", type=T.unit_float, default=0.5, help="partial merging: weight of A in merged channels")
    p.add_argument("--seeds", type=T.seed, nargs="+", default=[0, 1, 2], help="partial merging: random baselines")
    p.add_argument("--eval-split", default="test", help="partial merging: split to evaluate on (default: test)")
    p.add_argument("--batch-size", type=T.positive_int, default=256)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in the run folder")
    _add_device(p)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("regress", help="regress each channel of A on all channels of B's same layer (sparsity "
                       "sweep, R², recovered top-k of the regressed channels) over a probe/demo run")
    p.add_argument("run_dir", help="a run folder made by `mergescope probe` or `mergescope demo`")
    p.add_argument("--fit-images", type=T.positive_int, default=5000, metavar="N", help="fitting subset: N images spread "
                   "evenly over the classes (default 5000, the thesis's 5 per class × 1000 ImageNet classes; N ≥ 1; "
                   "capped by what the held-out subset leaves)")
    p.add_argument("--heldout-images", type=T.positive_int, default=5000, metavar="N", help="held-out subset R² is judged "
                   "on: N images spread evenly over the classes, disjoint from the fitting ones (default 5000, at most "
                   "a fifth of the dataset; N ≥ 1)")
    p.add_argument("--ridge", type=T.nonnegative_float, default=0.0, help="relative ridge λ (default 0: least squares)")
    p.add_argument("--k", type=T.positive_int, default=10, help="top-k images per channel")
    p.add_argument("--batch-size", type=T.positive_int, default=256)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier regression study in the run folder")
    _add_device(p)
    p.set_defaults(func=_cmd_regress)

    p = sub.add_parser("report", help="re-render report.html of a run folder from its stored results")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("layers", help="list a model's observable layers and permutation groups")
    p.add_argument("--arch")
    p.add_argument("--checkpoint")
    p.set_defaults(func=_cmd_layers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MergescopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
