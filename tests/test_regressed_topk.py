"""Top-k of regressed B channels: a permuted copy is recovered exactly, at every layer of a residual stream; the
reduction is of the combination; ``mergescope regress`` over a probe run folder, and ``mergescope report``
re-rendering its pages from what it stored."""
from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch

from mergescope.align.covariance import group_covariances
from mergescope.align.regressed_topk import pick, regressed_activations, regressed_topk, single_weight_fits
from mergescope.align.regression import regression_from_stats
from mergescope.cli import main
from mergescope.data.cache import file_sha256
from mergescope.data import iter_batches, load_digits, subset_per_class
from mergescope.models import create_model
from mergescope.perm import build_spec, permute_model, random_perms
from mergescope.probe import probe
from mergescope.train import save_checkpoint


@pytest.fixture(scope="module")
def train():
    return load_digits("train")


def test_regressed_topk_of_a_permuted_copy_is_the_models_own(helpers, train):
    a = helpers.randomize_batchnorm(create_model("cnn_digits", seed=0, width=8), seed=2).eval()
    spec = build_spec(a)
    b = permute_model(a, spec, random_perms(spec, torch.Generator().manual_seed(0)))
    [stats] = group_covariances(a, [b], spec, iter_batches(train, 50, ids=subset_per_class(train.targets, 5)))
    res = regression_from_stats(stats, fractions=(0.05, 1.0))
    fits = {g: [*single_weight_fits(stats[g], res.fits[g]), res.fits[g]] for g in res.fits}
    tops = regressed_topk(a, b, spec, res, iter_batches(train, 256), k=10, fits=fits)
    assert list(tops) == list(spec.layers)  # one observation point per group here
    assert {gt.group for gt in tops.values()} == set(spec.groups)
    for g, gt in tops.items():
        one = pick(gt, 1, refit=True)
        live = ~gt.constant & ~np.isnan(one.r2)  # not dead on the data nor on the fitting subset
        assert live.sum() >= len(live) // 2, g  # not vacuous
        assert one is not None and one.label == "m=1 refit"
        assert np.array_equal(one.ids[live], gt.a_ids[live]), g  # same images, same order
        assert (one.recovered[live] == 1).all(), g
        assert (gt.single_recovered[live] == 1).all(), g
        assert np.isnan(one.recovered[~live]).all() and (one.r2[live] > 1 - 1e-6).all()  # float32 products
        assert (pick(gt, gt.channels_b).recovered[live] >= 0.9).all(), g


def _resnet(seed: int = 0):
    return create_model("resnet20", width=0.5, in_channels=1, seed=seed)  # 8/16/32 channels; 8×8 digits


def test_regressed_topk_covers_every_layer_of_a_residual_stream(helpers, train):
    a = helpers.randomize_batchnorm(_resnet(), seed=2).eval()
    spec = build_spec(a, next(iter(iter_batches(train, 2))).x)
    streams = [g for g, grp in spec.groups.items() if len(grp.observe) > 1]
    assert len(streams) == 3  # the stem's stream and two more (test_perm: relu, layer1.0, layer1.1, layer1.2)
    b = permute_model(a, spec, random_perms(spec, torch.Generator().manual_seed(0)))
    [stats] = group_covariances(a, [b], spec, iter_batches(train, 50, ids=subset_per_class(train.targets, 5)))
    res = regression_from_stats(stats, fractions=None)
    fits = {g: [*single_weight_fits(stats[g], res.fits[g]), res.fits[g]] for g in res.fits}
    tops = regressed_topk(a, b, spec, res, iter_batches(train, 256), k=10, fits=fits)
    assert list(tops) == list(spec.layers)  # every observation point of every group, in graph order
    own = probe({"A": a}, train, k=10, progress=False)  # A's top-k at each layer, independently
    for layer, gt in tops.items():
        assert gt.layer == layer and gt.group == spec.layers[layer].group
        a_ids = own["A", layer].topk_ids.numpy()
        one = pick(gt, 1, refit=True)
        live = ~gt.constant & ~np.isnan(one.r2)
        assert live.sum() >= len(live) // 4, layer  # not vacuous (deep 2×2 ReLU maps of a random net: many dead)
        assert np.array_equal(gt.a_ids[live], a_ids[live]), layer  # A's top-k at THIS layer
        assert np.array_equal(one.ids[live], a_ids[live]), layer  # the regressed channel ranks like A's there
        assert (one.recovered[live] == 1).all() and (gt.single_recovered[live] == 1).all(), layer
    for g in streams:  # the layers of a stream rank different images: the first one does not stand for all
        first, *rest = [t.name for t in spec.groups[g].observe]
        assert any(not np.array_equal(tops[first].a_ids, tops[layer].a_ids) for layer in rest), g


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
    assert list(rows[0]) == ["layer", "channel", "m", "refit", "r2_heldout", "r2_in_sample", "recovered"]
    layers = {r["layer"] for r in rows}
    assert layers == {"features.2", "features.5", "features.9"}
    assert {r["refit"] for r in rows} == {"true", "false"}  # flags as in every CSV of a run
    results = json.loads((run / "results.json").read_text())
    [section] = [s for s in results["sections"] if s["title"] == "Regression alignment"]
    assert "regression.csv" in section["html"] and "regress_" in section["html"]
    assert "Regression alignment" in (run / "report.html").read_text()
    assert any(p.name.startswith("regress_") for p in (run / "features").iterdir())
    assert (run / "figures" / "regression.svg").is_file()
    assert main(["regress", str(run), "--quiet"]) == 2  # refuses to overwrite
    assert main(["regress", str(run), "--quiet", "--overwrite"]) == 0


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """A probe run folder of two random resnet20s on digits, with a regression study."""
    tmp = tmp_path_factory.mktemp("resnet")
    ckpts = []
    for s in (0, 1):
        path = tmp / f"r{s}.safetensors"
        save_checkpoint(path, _resnet(seed=s))
        ckpts.append(str(path))
    run = tmp / "run"
    assert main(["probe", *ckpts, "--data", "digits", "--out", str(run), "--quiet"]) == 0
    assert main(["regress", str(run), "--quiet"]) == 0
    return run


def test_regress_command_ranks_every_layer_of_a_residual_stream(resnet_run):
    spec = build_spec(_resnet())
    with open(resnet_run / "regression.csv", newline="") as f:
        layers = list(dict.fromkeys(r["layer"] for r in csv.DictReader(f)))
    assert layers == list(spec.layers)  # block outputs layer1.0, layer1.1, … each have rows of their own
    study = json.loads((resnet_run / "results.json").read_text())["regression"]
    assert study["layers"] == {layer: t.group for layer, t in spec.layers.items()}
    assert study["info"]["streams"]["conv1"] == ["relu", "layer1.0", "layer1.1", "layer1.2"]
    assert len(study["info"]["streams"]) == 3
    assert {p["layer"] for p in study["pages"]} == set(spec.layers)  # every layer has hard channels here
    assert (resnet_run / "features" / "regress_layer1.1.html").is_file()
    [section] = [s for s in json.loads((resnet_run / "results.json").read_text())["sections"]
                 if s["title"] == "Regression alignment"]
    assert "first" not in section["html"] and "<code>layer1.2</code>" in section["html"]


def _snapshot(run) -> dict[str, bytes]:
    """Every page, sprite sheet, figure and stored result of a run folder (report.html without its timestamp)."""
    files = {p.relative_to(run).as_posix(): p.read_bytes()
             for d in ("features", "figures") for p in (run / d).rglob("*") if p.is_file()}
    files |= {name: (run / name).read_bytes() for name in ("results.json", "regression_topk.json", "regression.csv")}
    files["report.html"] = re.sub(rb"\d{4}-\d\d-\d\d \d\d:\d\d UTC", b"", (run / "report.html").read_bytes())
    return files


def test_report_rerenders_the_regression_pages_as_first_rendered(resnet_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(resnet_run, run)
    before = _snapshot(run)
    assert "figures/regression.svg" in before and "features/regress_layer1.1.html" in before
    assert any(name.startswith("features/sprites/regress_") for name in before)
    for name in before:
        if "regress" in name and name.startswith(("features/", "figures/")):
            (run / name).unlink()
    (run / "report.html").write_text("stale")
    assert main(["report", str(run)]) == 0
    after = _snapshot(run)
    assert after.keys() == before.keys()
    assert [name for name in before if after[name] != before[name]] == []
    manifest = json.loads((run / "manifest.json").read_text())
    assert {"regression_topk.json", "features/regress_layer1.1.html", "report.html"} <= set(manifest["sha256"])
    for name, digest in manifest["sha256"].items():  # the manifest still fingerprints what is there
        assert hashlib.sha256((run / name).read_bytes()).hexdigest() == digest, name


def test_report_leaves_a_regression_study_without_stored_topk_alone(resnet_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(resnet_run, run)
    results = json.loads((run / "results.json").read_text())
    del results["regression"]["views"]  # as written before the top-k images were stored
    (run / "results.json").write_text(json.dumps(results))
    manifest = json.loads((run / "manifest.json").read_text())  # ...by that run, which vouched for it
    manifest["sha256"]["results.json"] = file_sha256(run / "results.json")
    (run / "manifest.json").write_text(json.dumps(manifest))
    page = run / "features" / "regress_layer1.1.html"
    page.write_text("old page")
    assert main(["report", str(run)]) == 0
    assert "no stored top-k images" in capsys.readouterr().err
    assert page.read_text() == "old page" and "Regression alignment" in (run / "report.html").read_text()
