"""Top-k of regressed B channels: a permuted copy is recovered exactly; the reduction is of the combination;
``mergescope regress`` over a probe run folder."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from mergescope.align.covariance import group_covariances
from mergescope.align.regressed_topk import pick, regressed_activations, regressed_topk, single_weight_fits
from mergescope.align.regression import regression_from_stats, regression_subset
from mergescope.cli import main
from mergescope.data import iter_batches, load_digits
from mergescope.models import create_model
from mergescope.perm import build_spec, permute_model, random_perms
from mergescope.train import save_checkpoint


@pytest.fixture(scope="module")
def train():
    return load_digits("train")


def test_regressed_topk_of_a_permuted_copy_is_the_models_own(helpers, train):
    a = helpers.randomize_batchnorm(create_model("cnn_digits", seed=0, width=8), seed=2).eval()
    spec = build_spec(a)
    b = permute_model(a, spec, random_perms(spec, torch.Generator().manual_seed(0)))
    [stats] = group_covariances(a, [b], spec, iter_batches(train, 50, ids=regression_subset(train)))
    res = regression_from_stats(stats, fractions=(0.05, 1.0))
    fits = {g: [*single_weight_fits(stats[g], res.fits[g]), res.fits[g]] for g in res.fits}
    tops = regressed_topk(a, b, spec, res, iter_batches(train, 256), k=10, fits=fits)
    assert set(tops) == set(spec.groups)
    for g, gt in tops.items():
        one = pick(gt, 1, refit=True)
        live = ~gt.constant & ~np.isnan(one.r2)  # not dead on the data nor on the fitting subset
        assert live.sum() >= len(live) // 2, g  # not vacuous
        assert one is not None and one.label == "m=1 refit"
        assert np.array_equal(one.ids[live], gt.a_ids[live]), g  # same images, same order
        assert (one.recovered[live] == 1).all(), g
        assert (gt.single_recovered[live] == 1).all(), g
        assert np.isnan(one.recovered[~live]).all() and (one.r2[live] > 1 - 1e-9).all()
        assert (pick(gt, gt.channels_b).recovered[live] >= 0.9).all(), g


def test_reduction_is_of_the_combination_not_a_combination_of_maxima():
    # two channels peaking at different positions: max(b0 + b1) = 2, max(b0) + max(b1) = 4
    fmap = torch.tensor([[[[2.0, 0.0]], [[0.0, 2.0]]]])  # (N=1, C=2, 1, 2)
    w = torch.tensor([[[1.0, 1.0]]])  # (M=1, C_A=1, C_B=2)
    c = torch.tensor([[0.5]])
    y = regressed_activations(fmap, w, c)
    combo_of_max = (w[0] @ fmap.amax((2, 3))[0] + c[0]).item()
    assert y.shape == (1, 1, 1)
    assert y.item() == pytest.approx(2.5) and combo_of_max == pytest.approx(4.5)
    assert regressed_activations(fmap, w, c, reduction="mean").item() == pytest.approx(2.5)


def test_regress_command_writes_csv_and_section(tmp_path, capsys):
    ckpts = []
    for s in (0, 1):
        path = tmp_path / f"m{s}.safetensors"
        save_checkpoint(path, create_model("cnn_digits", width=8, seed=s))
        ckpts.append(str(path))
    run = tmp_path / "run"
    assert main(["probe", *ckpts, "--data", "digits", "--out", str(run), "--quiet"]) == 0
    assert main(["regress", str(run), "--quiet"]) == 0
    with open(run / "regression.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["layer", "channel", "m", "refit", "r2", "recovered"]
    layers = {r["layer"] for r in rows}
    assert layers == {"features.2", "features.5", "features.9"}
    assert {r["refit"] for r in rows} == {"True", "False"}
    results = json.loads((run / "results.json").read_text())
    [section] = [s for s in results["sections"] if s["title"] == "Regression alignment"]
    assert "regression.csv" in section["html"] and "regress_" in section["html"]
    assert "Regression alignment" in (run / "report.html").read_text()
    assert any(p.name.startswith("regress_") for p in (run / "features").iterdir())
    assert (run / "figures" / "regression.png").is_file()
    assert main(["regress", str(run), "--quiet"]) == 2  # refuses to overwrite
    assert main(["regress", str(run), "--quiet", "--overwrite"]) == 0
