"""The parser: one vocabulary for every command, from shared option groups (argparse parent parsers).

The same name means the same thing everywhere: ``--data`` and ``--split`` (the images a study computes from),
``--eval-splits`` (what merged models are evaluated on), ``--arch``/``--arch-kwargs`` (the architecture of every
checkpoint given), ``--matching``, ``--match-points``, ``--methods``, ``--stats-images``, ``--batch-size``,
``--out``/``--overwrite``, ``--device``, ``--quiet`` and ``--config``. Every option's help shows its default.
Importing this module imports neither torch nor the studies.
"""
from __future__ import annotations

import argparse

from .. import _argtypes as T
from . import commands as C

# The parser imports no torch, so these restate the library's names (tests/test_cli_vocabulary.py checks they agree)
MATCHINGS = ("activation", "weight")  # mergescope.studies.plan.MATCHINGS
MATCH_POINTS = ("stage_end", "all")  # mergescope.perm.spec.MATCH_POINTS
STUDY_STAGES = ("train", "sweep", "features", "compare", "regress", "merge")  # mergescope.studies.study.STAGES
BENCH_METHODS = ("logit_ensemble", "prob_ensemble", "naive", "fedavg", "swa", "uniform_soup", "greedy_soup",
                 "task_arithmetic", "ties", "dare", "breadcrumbs", "fisher", "regmean", "permuted", "permuted+repair",
                 "permuted+reset", "ste", "zipit+repair", "permuted>ties")  # mergescope.studies.bench_merge's
BENCH_WORKLOADS = ("seeds", "halves", "halves_finetune", "stratified_finetune", "hparams", "checkpoints")
REQUIRED = "_required"  # the parser default naming a command's required options (checked after --config)


class _Formatter(argparse.HelpFormatter):
    """Help with the default shown for every option that has one (not for flags, nor options unset by default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "(default" in text or default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})" if shown != {} else text


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def common_options(config: bool = True) -> argparse.ArgumentParser:
    """--device, --quiet and (but for ``mergescope study``, whose config file is its argument) --config: every
    command that computes."""
    p = _parent()
    g = p.add_argument_group("common")
    g.add_argument("--device", type=T.device_or_auto, default="auto",
                   help="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--workers", type=T.workers, default="auto", help="processes that decode and resize images "
                   "(ImageFolder trees, JPEG packs) alongside the models: auto (one per CPU) or N; 0: none")
    g.add_argument("--decode", choices=("workers", "device"), default="workers", help="where the JPEGs of an "
                   "ImageFolder tree too large for memory (ImageNet) are decoded and resized: workers (Pillow, in "
                   "the --workers processes) or device (torchvision on --device, nvJPEG on a GPU: the workers only "
                   "read the files; pixels within a few levels of Pillow's)")
    if config:
        g.add_argument("--config", metavar="FILE", help="TOML or YAML file of options (keys: the option names, "
                       "e.g. batch_size = 256); options on the command line override it")
    return p


def model_options() -> argparse.ArgumentParser:
    """--arch, --arch-kwargs: how to build the checkpoints' architecture."""
    p = _parent()
    g = p.add_argument_group("models")
    g.add_argument("--arch", help="architecture of every checkpoint given: a zoo name (mergescope layers), tv_NAME "
                   "(torchvision) or timm:NAME; needed for state-dict files without a mergescope sidecar, checked "
                   "against the sidecar otherwise")
    g.add_argument("--arch-kwargs", type=T.json_object, default={}, help='builder arguments as JSON, e.g. '
                   '\'{"width": 4}\'; num_classes is read from the checkpoint when not given')
    return p


def data_options(split_help: str) -> argparse.ArgumentParser:
    """--data, --split."""
    p = _parent()
    g = p.add_argument_group("data")
    g.add_argument("--data", help="digits | cifar10:ROOT | PACK.npz | pack folder | ImageFolder tree")
    g.add_argument("--split", default="train", help=split_help)
    return p


def eval_options() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument_group("evaluation").add_argument("--eval-splits", nargs="+", default=["test"], metavar="SPLIT",
                                                     help="splits the merged models are evaluated on")
    return p


def run_options(out_help: str = "run folder") -> argparse.ArgumentParser:
    """--out, --overwrite."""
    p = _parent()
    g = p.add_argument_group("run folder")
    g.add_argument("--out", help=out_help)
    g.add_argument("--overwrite", action="store_true", help="replace what --out already holds (a study: rerun every "
                   "stage)")
    return p


def batch_options(default: int) -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--batch-size", type=T.positive_int, default=default, help="images per batch in every pass")
    return p


def matching_options() -> argparse.ArgumentParser:
    """--matching, --match-points: how models are aligned to the reference."""
    p = _parent()
    g = p.add_argument_group("alignment")
    g.add_argument("--matching", choices=MATCHINGS, default="activation", help="activation: correlation of "
                   "activations (Jordan et al. 2023); weight: Git Re-Basin weight matching (no data)")
    g.add_argument("--match-points", choices=MATCH_POINTS, default="stage_end", help="where a residual stream "
                   "is measured for matching and joint statistics: its stage's last block output (as REPAIR's "
                   "reference) or the average over every place it is seen")
    return p


def merging_options(default_methods: str, sweep: bool = False, combining: bool = False) -> argparse.ArgumentParser:
    """--methods, --stats-images: what merges, on how many statistics images (the names from the method registry,
    :mod:`mergescope.merge.methods`, which loads without torch; ``combining``: the methods with their own combine
    step and the compositions too)."""
    from ..merge.methods import list_merge_methods, methods_help

    p = _parent()
    g = p.add_argument_group("merging")
    exclude = tuple(list_merge_methods(sweepable=False)) if sweep else ()
    compositions = "; or alignment>aggregation, e.g. permuted>ties+reset" if combining else ""
    g.add_argument("--methods", nargs="+", metavar="METHOD", help=methods_help(default_methods, exclude=exclude,
                                                                              combining=combining) +
                   compositions + "; `mergescope methods` describes each")
    g.add_argument("--stats-images", type=T.positive_int, metavar="N", help="use N fixed random images of --split "
                   "for matching, map and REPAIR statistics (default: all)")
    return p


def combine_options() -> argparse.ArgumentParser:
    """--base, --sample-counts, --heldout-split: what the methods with their own combine step read (task vectors,
    FedAvg, greedy soup)."""
    p = _parent()
    g = p.add_argument_group("combining")
    g.add_argument("--base", metavar="CKPT", help="the shared base the models were fine-tuned from (task "
                   "arithmetic, TIES, DARE, Breadcrumbs)")
    g.add_argument("--sample-counts", nargs="+", type=T.positive_int, metavar="N", help="each model's number of "
                   "training examples (FedAvg; default: what the checkpoints' sidecars record)")
    g.add_argument("--heldout-split", metavar="SPLIT", help="the split a greedy soup is scored on")
    return p


def _command(sub, name: str, help_: str, parents: list, func, required: tuple[str, ...] = ()):
    p = sub.add_parser(name, help=help_, description=help_, parents=parents, formatter_class=_Formatter)
    p.set_defaults(func=func, **{REQUIRED: required})
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``mergescope`` parser (no torch import)."""
    parser = T.OneLineParser(prog="mergescope", description="Align independently trained networks by permutation, "
                             "merge them, and look inside the result.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=T.OneLineParser)
    stats_split = "the images for matching, feature and REPAIR statistics"
    common = common_options()

    p = _command(sub, "demo", "the whole study (examples/digits.toml) on the embedded digits: train three CNNs, sweep, "
                 "feature pages, comparison, regression, N-model merge, overview report (minutes on a CPU)",
                 [common_options(), matching_options(), run_options("study folder")], C.demo)
    p.set_defaults(out="runs/demo")
    p.add_argument("--epochs", type=T.positive_int, default=6, help="training epochs per model")

    p = _command(sub, "train", "train one model and save it as safetensors + JSON sidecar",
                 [common, data_options("the images to train on"), run_options("checkpoint path (*.safetensors)"),
                  batch_options(128)], C.train, required=("arch", "data", "out"))
    p.add_argument("--arch", help="zoo name (see `mergescope layers`), tv_NAME or timm:NAME, e.g. resnet20")
    p.add_argument("--arch-kwargs", type=T.json_object, default={}, help='builder arguments as JSON, e.g. '
                   '\'{"width": 4}\'')
    p.add_argument("--seed", type=T.seed, default=0, help="initialisation and data-order seed")
    p.add_argument("--epochs", type=T.positive_int, default=10, help="training epochs")
    p.add_argument("--lr", type=T.positive_float, default=0.1, help="peak learning rate (one-cycle)")
    p.add_argument("--label-smoothing", type=T.unit_float, default=0.0, help="label smoothing of the loss")
    p.add_argument("--augment", action="store_true", help="random crop + flip (32 px and larger images)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--eval", action="store_true", help="evaluate on the test split after training")
    p.add_argument("--part", choices=("a", "b"), help="train on one half of the 'stratified' class split")
    p.add_argument("--major", type=T.unit_float, default=0.8,
                   help="stratified split: share of the first half of classes")
    p.add_argument("--split-seed", type=T.seed, default=0, help="seed of the stratified split")
    p.add_argument("--init", metavar="CKPT", help="start from this checkpoint's weights instead of the seed's "
                   "initialisation (a fine-tune of a shared base; its path and sha256 go into the sidecar)")
    p.add_argument("--classes", metavar="LIST", help="train on the images of these classes only, e.g. 0-4 or "
                   "0,2,5-7 (ZipIt!'s halves: 0-4 and 5-9)")

    checkpointed = [common, model_options()]
    p = _command(sub, "sweep", "align two checkpoints, merge along α with every method, evaluate, report",
                 [*checkpointed, data_options(stats_split), eval_options(), run_options(), batch_options(500),
                  matching_options(), merging_options("naive permuted permuted+repair permuted+reset", sweep=True)],
                 C.sweep, required=("checkpoints", "data", "out"))
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="model A (the reference), then model B")
    p.add_argument("--alpha-step", type=T.alpha_step, default=0.05, help="spacing of the α grid (1/n)")

    p = _command(sub, "merge", "merge two or more models into one with every method (all into the first one's "
                 "channel space) and evaluate each merge",
                 [*checkpointed, data_options(stats_split), eval_options(), run_options(), batch_options(500),
                  matching_options(), merging_options("naive permuted permuted+repair permuted+reset cca+repair "
                                                      "ot+repair regression+repair", combining=True),
                  combine_options()],
                 C.merge, required=("checkpoints", "data", "out"))
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="two or more checkpoints of one architecture; "
                   "the first is the reference")
    p.add_argument("--weights", nargs="+", type=T.unit_float, metavar="W", help="one weight per model, summing to "
                   "1 (default: equal weights)")

    p = _command(sub, "probe", "top-k images of every channel of every layer, models aligned to the first",
                 [*checkpointed, data_options("the images to rank"), run_options(), batch_options(256),
                  matching_options()], C.probe, required=("checkpoints", "data", "out"))
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="reference model first, then the models to "
                   "align to it")
    p.add_argument("--k", type=T.positive_int, default=10, help="images per channel")
    p.add_argument("--reduction", choices=("max", "mean"), default="max", help="feature map -> one number per image")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32", help="the probe pass's "
                   "forward: float32 (the thesis's), or bfloat16 autocast (about twice as fast on a GPU with bfloat16 "
                   "units; near-equal images can swap places in a top-k); the alignment is computed in float32")
    p.add_argument("--alpha", type=T.unit_float, metavar="ALPHA", help="also probe A and B merged at α = ALPHA "
                   "(permuted, permuted + REPAIR, direct average)")
    p.add_argument("--layers", nargs="+", default=["conv"], metavar="LAYER", help="conv: the thesis's layers "
                   "(convolutional channels and residual block outputs); all: linear layers too; or layer names "
                   "(mergescope layers)")
    p.add_argument("--subset-images", type=T.positive_int, default=5000, metavar="N", help="D′, the fixed subset "
                   "whose activations the probe keeps for Kendall's τ: N images spread evenly over the classes, "
                   "capped by the dataset (the thesis's subset size)")

    p = _command(sub, "compare", "compare every channel of the reference with the aligned models' (τ, δ, overlap, "
                 "correlation; Observations 1-3; partial merging) over a probe/demo run",
                 [common, eval_options(), batch_options(256)], C.compare, required=("run_dir",))
    p.add_argument("run_dir", nargs="?", help="a run folder made by `mergescope probe` or `mergescope demo`")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in the run folder")
    p.add_argument("--embedder", choices=("clip", "fallback"),
                   help="image embedder for δ (default: clip with --clip-weights, else the fallback: penultimate "
                        "features of model A, labelled 'fallback', never CLIP)")
    p.add_argument("--clip-weights", help="local CLIP weights file for open_clip (or a tag in its cache)")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name (OpenAI weights from a file need "
                   "ViT-B-32-quickgelu)")
    p.add_argument("--null-quantile", type=T.unit_float, default=0.95, help="similar = beyond this quantile of the "
                   "metric between unmatched channels of the layer (lower tail for clip_delta)")
    p.add_argument("--null-partners", type=T.positive_int, default=32, help="unmatched partners sampled per channel "
                   "for that null (seeded; all of them in smaller layers)")
    p.add_argument("--threshold", type=T.finite_float, default=0.5, help="Observation 3's named variant "
                   "'fixed_threshold': similar when the consensus metric is >= this (<= for clip_delta)")
    p.add_argument("--consensus-metric", choices=("kendall_tau", "overlap", "correlation", "clip_delta"),
                   default="kendall_tau", help="metric whose null judgement decides Observations 2 and 3")
    p.add_argument("--partial-merge", action="store_true", help="also merge only the top/bottom x%% channels by "
                   "each metric (vs random channels) and plot accuracy curves; evaluated on the first --eval-splits")
    p.add_argument("--alpha", type=T.unit_float, default=0.5, help="partial merging: weight of A in merged channels")
    p.add_argument("--seeds", type=T.seed, nargs="+", default=[0, 1, 2], help="partial merging: random baselines")

    p = _command(sub, "regress", "regress each channel of A on all channels of B's same layer (sparsity sweep, R², "
                 "recovered top-k of the regressed channels) over a probe/demo run", [common, batch_options(256)],
                 C.regress, required=("run_dir",))
    p.add_argument("run_dir", nargs="?", help="a run folder made by `mergescope probe` or `mergescope demo`")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier regression study in the run folder")
    p.add_argument("--fit-images", type=T.positive_int, default=5000, metavar="N", help="fitting subset: N images "
                   "spread evenly over the classes (the thesis's 5 per class × 1000 ImageNet classes; capped by "
                   "what the held-out subset leaves)")
    p.add_argument("--heldout-images", type=T.positive_int, default=5000, metavar="N", help="held-out subset R² is "
                   "judged on: N images spread evenly over the classes, disjoint from the fitting ones (at most a "
                   "fifth of the dataset)")
    p.add_argument("--ridge", type=T.nonnegative_float, default=0.0, help="relative ridge λ (0: least squares)")
    p.add_argument("--k", type=T.positive_int, default=10, help="top-k images per channel")

    p = _command(sub, "report", "re-render report.html of a run folder from its stored results", [], C.report,
                 required=("run_dir",))
    p.add_argument("run_dir", nargs="?", help="a finished run folder")

    p = _command(sub, "layers", "list a model's observable layers (and which the probe takes by default) and its "
                 "permutation groups", [model_options()], C.layers)
    p.add_argument("--checkpoint", help="a checkpoint (with --arch when it has no sidecar)")

    p = _command(sub, "study", "the thesis's whole experiment from one config file: train or load the models, "
                 "sweep, feature pages, channel comparison, regression, N-model merge; stored stage by stage, a rerun "
                 "does only what changed", [common_options(config=False), data_options(stats_split), eval_options(),
                                             run_options("study folder")], C.study, required=("study_config",))
    # the shared options, unset unless given: the file's values stand unless the command line overrides them
    p.set_defaults(data=None, split=None, eval_splits=None, device=None)
    p.add_argument("study_config", nargs="?", metavar="CONFIG", help="TOML or YAML study file (see examples/): its "
                   "keys are the commands' options; the options below override its top level")
    p.add_argument("--only", choices=STUDY_STAGES, metavar="STAGE", help="run just this stage; the stages it reads "
                   f"must be stored ({', '.join(STUDY_STAGES)})")
    p.add_argument("--from", dest="start", choices=STUDY_STAGES, metavar="STAGE", help="rerun this stage and every "
                   "stage after it")

    p = _command(sub, "bench-merge", "every merge method on workloads trained for each family (independent seeds, "
                 "ZipIt!'s class halves, fine-tunes of one base, checkpoints of one run): one table of accuracy per "
                 "subset and overall, data passes, seconds; CSV and a report",
                 [common, model_options(), data_options(stats_split), eval_options(), run_options(),
                  batch_options(500), matching_options(), merging_options(" ".join(BENCH_METHODS), combining=True)],
                 C.bench_merge, required=("data", "out", "arch"))
    p.add_argument("--workloads", nargs="+", metavar="NAME", help=f"default: {' '.join(BENCH_WORKLOADS)} "
                   "(mergescope.studies.workloads)")
    p.add_argument("--models", type=T.positive_int, default=2, help="models per workload where the count is free "
                   "(seeds, hparams, checkpoints)")
    p.add_argument("--epochs", type=T.positive_int, default=3, help="epochs from scratch (and of the base)")
    p.add_argument("--finetune-epochs", type=T.positive_int, default=2, help="epochs of a fine-tune of the base")
    p.add_argument("--lr", type=T.positive_float, default=0.1, help="peak learning rate from scratch")
    p.add_argument("--finetune-lr", type=T.positive_float, default=0.02, help="peak learning rate of a fine-tune "
                   "(SWA's constant rate)")
    p.add_argument("--train-batch-size", type=T.positive_int, default=128, help="images per SGD step")
    p.add_argument("--augment", action="store_true", help="random crop + flip while training (32 px and larger)")
    p.add_argument("--holdout", type=T.positive_int, default=100, metavar="N", help="training images kept out of "
                   "every model's training: the held-out split a greedy soup is scored on")
    p.add_argument("--checkpoints", metavar="DIR", help="train the workloads' models here and reuse those already "
                   "trained with the same configuration (default: OUT/checkpoints, trained afresh)")

    _command(sub, "methods", "list every merge method: family, paper, hyperparameters, exact for permuted copies",
             [], C.methods)
    return parser
