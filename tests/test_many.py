"""Merging N models: permuted copies of one model merge back into it with every method; trained models merge
with one pass per purpose, and REPAIR recovers what the direct average loses."""
from __future__ import annotations

import pytest
import torch

from mergescope.data import iter_batches, load_digits, subset_per_class
from mergescope.errors import MergescopeError
from mergescope.studies.merge import MergeConfig
from mergescope.studies.merge import run as merge_study
from mergescope.models import create_model
from mergescope.perm import build_spec, permute_model, random_perms
from mergescope.train import TrainConfig, train_model

ALIGNED = ["permuted", "permuted+repair", "permuted+reset", "mergemany", "mergemany+repair", "cca", "cca+repair", "ot",
           "ot+repair", "regression", "regression+repair"]


@pytest.fixture(scope="module")
def digits():
    train, test = load_digits("train"), load_digits("test")
    return train, test


def _outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name, kw", [("cnn_digits", {"width": 8}), ("mlp", {"width": 32, "depth": 2})])
def test_five_permuted_copies_merge_back_into_the_model(name, kw, helpers, digits):
    model = helpers.randomize_batchnorm(create_model(name, seed=0, **kw), seed=2).eval()
    spec = build_spec(model)
    copies = [model] + [permute_model(model, spec, random_perms(spec, torch.Generator().manual_seed(s)))
                        for s in range(1, 5)]
    train = digits[0]
    ids = subset_per_class(train.targets, 20)
    res = merge_study(copies, train, {}, MergeConfig(["naive", *ALIGNED], batch_size=100, stats_ids=ids), spec=spec)
    x = next(iter(iter_batches(train, 64))).x
    want = _outputs(model, x)
    scale = want.abs().max()
    for method in res.methods:
        if method == "permuted+reset" and name == "mlp":
            continue
        err = ((_outputs(res.merged[method], x) - want).abs().max() / scale).item()
        if method == "naive":
            assert err > 0.1  # the direct average of shuffled copies is another function
        elif method != "permuted+reset":  # RESET re-estimates BatchNorm statistics: a different (valid) model
            assert err < 1e-3, method
    assert "permuted+reset" not in res.methods or name != "mlp"
    assert res.passes == {"matching": 1, "map statistics": 1, "repair/reset": 1, "evaluation": 0}


def test_merging_five_trained_models(digits):
    train, test = digits
    models = []
    for seed in range(5):
        m = create_model("cnn_digits", width=16, seed=seed)
        train_model(m, train, TrainConfig(epochs=4, batch_size=64, lr=0.05, seed=seed), progress=False)
        models.append(m.eval())
    res = merge_study(models, train, {"test": test}, MergeConfig(["naive", "permuted", "permuted+repair",
                                                                 "mergemany+repair", "cca+repair"]))
    assert res.passes == {"matching": 1, "map statistics": 1, "repair/reset": 1, "evaluation": 1}
    acc = {r["method"]: r["accuracy"] for r in res.rows}
    ends = [e["accuracy"] for e in res.endpoints]
    assert len(ends) == 5 and min(ends) > 0.9
    summary = res.summary["test"]
    assert summary["mean_endpoint_accuracy"] == pytest.approx(sum(ends) / 5)
    assert summary["gap"]["permuted+repair"] == pytest.approx(acc["permuted+repair"] - sum(ends) / 5)
    assert acc["naive"] < 0.5  # five independent networks averaged directly: far below the endpoints
    assert acc["permuted+repair"] > acc["permuted"] > acc["naive"]
    assert acc["cca+repair"] > acc["naive"] + 0.3
    assert acc["mergemany+repair"] > acc["naive"] + 0.3


def test_merge_many_refuses_what_it_cannot_do(digits):
    m = [create_model("cnn_digits", width=4, seed=s) for s in range(3)]
    with pytest.raises(MergescopeError, match="zipit merges at most 2 models, got 3"):
        merge_study(m, digits[0], {}, MergeConfig(["zipit"]))
    with pytest.raises(MergescopeError, match=r"unknown merge method 'cca\+fancy'"):
        merge_study(m, digits[0], {}, MergeConfig(["cca+fancy"]))
    with pytest.raises(MergescopeError, match="at least two"):
        merge_study(m[:1], digits[0], {}, MergeConfig(["naive"]))
