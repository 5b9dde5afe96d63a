"""``mergescope demo``: the whole study on data that ships with scikit-learn, in about a minute on a CPU.

Three small CNNs are trained on the 8×8 handwritten digits from different seeds. Model B is aligned to model A by
activation matching and the interpolation path is swept with the direct average, permutation, permutation +
REPAIR, permutation + RESET, and CCA and regression merging with REPAIR. Then one probe pass over the training images records, for every channel of every
layer, the top-10 images of A, B, aligned B, the merged models at α = 0.5 and the direct average — and of B and C
aligned to A — which become the report's feature pages. Every channel of A is then compared with the same
channel of aligned B and C (Kendall τ on D′, δ of the top-k images with the fallback embedder — not CLIP —,
top-k overlap, matching correlation, Observations 2 and 3) and A and B are partially merged channel by channel,
guided by each metric, against random channels (:mod:`mergescope.studies.compare`). Finally all three models are
merged into one with every method (:mod:`mergescope.studies.merge`). The run folder gets checkpoints,
``interpolation.csv``, ``results.json``, ``probe/`` (the stored top-k), ``features/``, ``compare.csv``,
``partial_merge.csv``, ``merges.csv``, ``report.html`` and ``manifest.json``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..align.store import ALIGNMENT_FILE
from ..data import load_digits
from ..merge import alpha_grid
from ..models import create_model
from ..report.features import feature_index_html
from ..runs import prepare_run_dir, write_manifest
from ..train import TrainConfig, checkpoint_sha256, save_checkpoint, train_model
from . import compare, merge, probe, sweep
from .compare import CompareConfig, PartialMergeInputs, make_embedder
from .probe import aligned_key, merged_rows


@dataclass
class DemoConfig:
    """The demo's settings (all recorded in the manifest)."""

    arch: str = "cnn_digits"  # zoo model trained on the digits
    width: int = 16  # channel width multiplier of the model
    seeds: tuple[int, ...] = (0, 1, 2)  # initialisation + data-order seeds of models A, B (and C, D... for the
    #                                      many-to-one feature view)
    epochs: int = 6  # training epochs per model
    lr: float = 0.05  # peak SGD learning rate (one-cycle schedule)
    batch_size: int = 64  # training batch size
    alpha_step: float = 0.05  # spacing of the α grid
    matching: str = "activation"  # "activation" or "weight"
    compare: bool = True  # channel comparison (fallback embedder) and metric-guided partial merging of A and B
    merge_all: bool = True  # merge all the models into one with every method (mergescope.studies.merge)
    methods: tuple[str, ...] = (*sweep.METHODS, "cca+repair", "regression+repair")  # the methods swept along α


def run_folder(out: str | Path, config: DemoConfig | None = None, progress: bool = True,
               overwrite: bool = False, device: str = "cpu") -> dict:
    """Train two digit models, sweep every merge method, and write the run folder with its report.

    Returns:
        The results dictionary rendered into the report (rows, endpoints, matching, summary).
    """
    cfg = config or DemoConfig()
    run_dir = prepare_run_dir(out, overwrite=overwrite)
    start = time.perf_counter()
    train, test = load_digits("train"), load_digits("test")
    models, files, train_metrics, sources = [], [], {}, {}
    tags = [chr(ord("A") + i) for i in range(len(cfg.seeds))]
    for tag, seed in zip(tags, cfg.seeds):
        model = create_model(cfg.arch, width=cfg.width, in_channels=train.num_channels,
                             num_classes=len(train.classes), seed=seed)
        tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, device=device)
        metrics = train_model(model, train, tcfg, eval_ds=test, progress=progress)
        train_metrics[tag] = {k: metrics[k] for k in ("final_train_acc", "test_acc", "train_seconds")}
        ckpt = run_dir / "checkpoints" / f"model_{tag}.safetensors"
        side = save_checkpoint(ckpt, model, {"seed": seed, "train_config": tcfg.to_dict(), "metrics": metrics,
                                             "dataset": train.name, "dataset_fingerprint": train.fingerprint})
        files += [ckpt, side]
        sources[tag] = {"checkpoint": str(ckpt), "sha256": checkpoint_sha256(ckpt)}
        models.append(model)

    sweep_cfg = sweep.SweepConfig(alphas=alpha_grid(cfg.alpha_step), methods=cfg.methods, matching=cfg.matching,
                                  batch_size=len(train))
    result = sweep.run(models[0], models[1], train, {"test": test, "train": train}, sweep_cfg, device=device,
                       progress=progress)
    probed, pages, recipes = probe.run(run_dir, train, dict(zip(tags, models)), matches={tags[1]: result.match},
                                       merged=merged_rows(result.midpoint), spec=result.spec, batch_size=len(train),
                                       device=device, progress=progress, sources=sources)
    files.append(run_dir / ALIGNMENT_FILE)
    sections, extra, timings = [], {}, dict(result.timings)
    if cfg.compare:
        t0 = time.perf_counter()
        compare_cfg = CompareConfig(partial_merge=True, batch_size=len(train))
        partial = PartialMergeInputs(models[0], result.aligned_b, result.spec, test, (tags[0], aligned_key(tags[1])))
        compared = compare.run(run_dir, train, probed, recipes, compare_cfg,
                               embedder=make_embedder(compare_cfg, models[0], train, tags[0]), partial=partial,
                               device=device, progress=progress)
        pages, recipes, files = compared.pages, compared.recipes, files + compared.files
        extra["compare"] = {**compared.to_json(), "config": dataclasses.asdict(compare_cfg)}
        timings["channel comparison"] = time.perf_counter() - t0
    sections.insert(0, {"title": "Feature visualization", "html": feature_index_html(pages)})
    if cfg.compare:
        sections.append(compared.section)
    if cfg.merge_all and len(models) > 2:
        t0 = time.perf_counter()
        many = merge.run(models, train, {"test": test}, merge.MergeConfig(batch_size=len(train)), spec=result.spec,
                         device=device, progress=progress)
        section, written = merge.write_section(run_dir, many)
        sections.append(section)
        files += written
        extra["many"] = many.to_json()
        timings[f"merging {len(models)} models"] = time.perf_counter() - t0
    elapsed = time.perf_counter() - start
    summary = {
        "architecture": f"{cfg.arch} (width {cfg.width})", "dataset": f"digits ({len(train)} train / {len(test)} test)",
        "seeds": dict(zip(tags, cfg.seeds)), "matching": cfg.matching, "data passes": result.passes,
        "runtime": f"{elapsed:.1f} s on " + (f"{torch.get_num_threads()} CPU threads" if device == "cpu" else device),
    }
    files += sweep.save(run_dir, result, "mergescope demo: digit CNNs, aligned, merged and looked inside", summary,
                        sections, features={"data": "digits", "split": "train", "views": recipes}, extra=extra)
    write_manifest(run_dir, {"demo": dataclasses.asdict(cfg), "sweep": dataclasses.asdict(sweep_cfg)}, files,
                   dataset={"name": train.name, "train_fingerprint": train.fingerprint,
                            "test_fingerprint": test.fingerprint},
                   training=train_metrics, timings={**timings, "total": elapsed})
    return result.to_json()

