"""``mergescope demo``: the whole study (:mod:`mergescope.studies.study`) on data that ships with scikit-learn, in
about a minute on a CPU — the study that ``examples/digits.toml`` writes as a config file.

Three small CNNs are trained on the 8×8 handwritten digits from different seeds. B is aligned to A and the
interpolation path is swept with the direct average, permutation, permutation + REPAIR, permutation + RESET, and
CCA and regression merging with REPAIR (Fig. 3.1); every model is aligned to A and probed in one pass, with A and B
merged at α = 0.5 (the feature pages: Figs. 3.3–3.4); every channel of A is compared with the same channel of aligned
B and C (Kendall τ on D′, δ of the top-k images with the fallback embedder — not CLIP —, top-k overlap, matching
correlation; Observations 1–3) and A and B are partially merged channel by channel, guided by each metric, against
random channels (Fig. 3.2); A's channels are regressed on B's (Fig. 3.5); and all three models are merged into one
with every method. The study folder gets ``checkpoints/``, ``sweep/``, ``features/``, ``merge/``, ``stages.json``
and the overview ``report.html``.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import MergescopeError
from . import study
from .sweep import METHODS as SWEEP_METHODS


@dataclass
class DemoConfig:
    """The demo's settings (all recorded in the study's record)."""

    arch: str = "cnn_digits"  # zoo model trained on the digits
    width: int = 16  # channel width multiplier of the model
    seeds: tuple[int, ...] = (0, 1, 2)  # initialisation + data-order seeds of models A, B, C…
    epochs: int = 6  # training epochs per model
    lr: float = 0.05  # peak SGD learning rate (one-cycle schedule)
    batch_size: int = 64  # training batch size
    alpha_step: float = 0.05  # spacing of the α grid
    matching: str = "activation"  # "activation" or "weight"
    match_points: str = "stage_end"  # where a residual stream is measured: "stage_end" (the reference) or "all"
    methods: tuple[str, ...] = (*SWEEP_METHODS, "cca+repair", "regression+repair")  # the methods swept along α
    eval_splits: tuple[str, ...] = ("test", "train")


def study_config(out: str | Path, config: DemoConfig | None = None, device: str = "cpu") -> study.StudyConfig:
    """The demo as a :class:`~mergescope.studies.study.StudyConfig` (what ``examples/digits.toml`` parses to)."""
    from ..data import load_digits
    from ..merge import alpha_grid
    from .compare import CompareConfig
    from .merge import MergeConfig
    from .probe import ProbeConfig
    from .regress import RegressConfig
    from .sweep import SweepConfig
    from .train import TrainRunConfig

    cfg = config or DemoConfig()
    every = len(load_digits("train"))  # every pass in one batch
    train = TrainRunConfig(arch=cfg.arch, arch_kwargs={"width": cfg.width}, epochs=cfg.epochs,
                           batch_size=cfg.batch_size, lr=cfg.lr)
    return study.StudyConfig(
        out=str(out), data="digits", models=study.ModelsConfig(train=train, seeds=list(cfg.seeds)), split="train",
        eval_splits=list(cfg.eval_splits), device=device,
        sweep=(SweepConfig(alphas=alpha_grid(cfg.alpha_step), methods=list(cfg.methods), matching=cfg.matching,
                           batch_size=every, match_points=cfg.match_points), None),
        features=ProbeConfig(k=10, alpha=0.5, batch_size=every, matching=cfg.matching, match_points=cfg.match_points),
        compare=CompareConfig(partial_merge=True, batch_size=every),
        regress=RegressConfig(k=10),
        merge=(MergeConfig(batch_size=every, matching=cfg.matching, match_points=cfg.match_points), None),
        options={"demo": {"matching": cfg.matching, "match_points": cfg.match_points, "epochs": cfg.epochs}})


def run_folder(out: str | Path, config: DemoConfig | None = None, progress: bool = True, overwrite: bool = False,
               device: str = "cpu", say: Callable[[str], None] = print) -> study.StudyOutcome:
    """Run the demo study into ``out`` (stage by stage: a rerun redoes only what changed).

    A folder that holds something other than a study is refused unless ``overwrite`` (then it is replaced);
    ``overwrite`` on a study reruns every stage.
    """
    out = Path(out)
    is_study = (out / study.RECORD).is_file()
    if out.exists() and any(out.iterdir()) and not is_study:
        if not overwrite:
            raise MergescopeError(f"{out} holds something other than a mergescope study; pass --overwrite to "
                                  "replace it or choose another --out")
        shutil.rmtree(out)
    return study.run_folder(study_config(out, config, device), start="train" if overwrite and is_study else None,
                            progress=progress, say=say)
