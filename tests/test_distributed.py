"""Every data pass sharded over 2 gloo ranks gives the one-process result, each rank walking only its share.

One spawn runs every pass kind on both ranks (matching statistics, joint covariances, REPAIR/RESET, evaluation,
the regression fit and its top-k) on trained digits models; each test compares one pass kind with the same
pass in this process, and checks which images each rank loaded. The last test runs the CLI under torchrun.
"""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mergescope.align.activation_matching import match_many
from mergescope.align.covariance import group_covariances_at
from mergescope.align.regressed_topk import regressed_topk
from mergescope.align.regression import regress_many, regression_subsets
from mergescope.data import iter_batches, load_digits
from mergescope.distributed import world
from mergescope.evaluate.evaluate import evaluate_models
from mergescope.merge.interpolate import interpolate_model
from mergescope.merge.repair import extra_layers, repair_and_reset
from mergescope.models import create_model
from mergescope.perm import build_spec, permute_model
from mergescope.train.evaluation import evaluate_model

BS = 100  # 15 batches of the 1,437 training images, 4 of the 360 test images
WORLD = 2


class Recording:
    """Delegates to an in-memory dataset and records the image ids every ``get_batch`` loads."""

    def __init__(self, ds):
        self.ds, self.loaded = ds, []

    def __len__(self):
        return len(self.ds)

    def __getattr__(self, name):
        return getattr(self.ds, name)

    def get_batch(self, ids):
        self.loaded.append(ids.clone())
        return self.ds.get_batch(ids)

    def take(self) -> list[int]:
        """The ids loaded since the last call, in loading order."""
        ids = torch.cat(self.loaded).tolist() if self.loaded else []
        self.loaded = []
        return ids


def every_pass(models: dict, fit: list[int], held: list[int]) -> tuple[dict, dict]:
    """Run each pass kind once; returns (results, ids loaded per pass kind)."""
    train, test = Recording(load_digits("train")), Recording(load_digits("test"))
    a, b, ra, rb = models["a"], models["b"], models["ra"], models["rb"]
    x = load_digits("train").get_batch(torch.arange(4))[0]
    spec, rspec = build_spec(a, x), build_spec(ra, x)
    out, seen = {}, {}

    [m] = match_many(a, [b], spec, iter_batches(train, BS))
    out["matching"], seen["matching"] = (m.perms, m.similarity, m.dead_a, m.dead_b), train.take()

    stats = group_covariances_at(a, [b], spec, iter_batches(train, BS), ("observe", "preactivation"))
    out["covariance"] = {(place, g): (st.n, st.mean, st.scatter) for place, [per] in stats.items()
                         for g, st in per.items()}
    seen["covariance"] = train.take()

    aligned = permute_model(b, spec, m.perms)
    repaired, reset = interpolate_model(a, aligned, 0.5), interpolate_model(a, aligned, 0.5)
    repair_and_reset(a, aligned, spec, iter_batches(train, BS), repair=[(0.5, repaired)], reset=[reset])
    seen["repair"] = train.take()
    block = interpolate_model(ra, rb, 0.5)  # residual: block outputs through added layers, every BatchNorm reset
    repair_and_reset(ra, rb, rspec, iter_batches(train, BS), repair=[(0.5, block)])
    seen["repair"] += train.take()
    out["repair"] = {name: {k: v.clone() for k, v in net.state_dict().items()}
                     for name, net in (("repaired", repaired), ("reset", reset), ("block", block))}
    out["extra_layers"] = extra_layers(block)

    merged = interpolate_model(a, aligned, 0.5)  # the same weights on every rank (the permutations are)
    out["evaluation"] = (evaluate_models({"a": a, "b": b, "merged": merged}, iter_batches(test, BS)),
                         evaluate_model(merged, test, BS))
    seen["evaluation"] = test.take()

    [res] = regress_many(a, [b], spec, iter_batches(train, BS, ids=fit), fractions=(0.25,),
                         heldout_batches=iter_batches(train, BS, ids=held))
    tops = regressed_topk(a, b, spec, res, iter_batches(train, BS, ids=held), k=5)
    seen["regression"] = train.take()
    out["regression"] = ({g: (f.weight, f.intercept, f.r2, f.r2_fit) for g, f in res.fits.items()},
                         {g: [(f.label, f.weight, f.r2) for f in fs] for g, fs in res.sweep.items()},
                         res.samples, res.heldout_samples)
    out["topk"] = _topk(tops)

    # one batch per pass: rank 0 walks none and must still end with the result
    [one] = group_covariances_at(a, [b], spec, iter_batches(train, len(train)), ("observe",))["observe"]
    block1 = interpolate_model(ra, rb, 0.5)
    repair_and_reset(ra, rb, rspec, iter_batches(train, len(train)), repair=[(0.5, block1)])
    tops1 = regressed_topk(a, b, spec, res, iter_batches(train, len(train), ids=held), k=5)
    out["one_batch"] = ({g: (st.n, st.mean, st.scatter) for g, st in one.items()}, block1.state_dict(),
                        _topk(tops1), evaluate_models({"a": a}, iter_batches(test, len(test))))
    seen["one_batch"] = train.take() + test.take()
    return out, seen


def _topk(tops: dict) -> dict:
    return {layer: (gt.a_ids, gt.single_ids, gt.constant, {k: m.ids for k, m in gt.maps.items()})
            for layer, gt in tops.items()}


def _worker(rank: int, init_file: str, models_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        assert world() == (rank, WORLD)
        args = torch.load(models_file, weights_only=False)
        torch.save(every_pass(*args), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(trained_digits, tmp_path_factory):
    """(one-process (results, seen), [per rank (results, seen)], fitting ids, held-out ids)."""
    tmp = tmp_path_factory.mktemp("distributed")
    models = {"a": trained_digits("cnn_digits", 0, width=16), "b": trained_digits("cnn_digits", 1, width=16),
              # the residual rule's path (added layers, BatchNorm reset) on an untrained pair: training it costs ~18 s
              "ra": create_model("resnet20", seed=0, in_channels=1, width=1).eval(),
              "rb": create_model("resnet20", seed=1, in_channels=1, width=1).eval()}
    fit, held = (ids.tolist() for ids in regression_subsets(load_digits("train"), 500, 250))
    torch.save((models, fit, held), tmp / "models.pt")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp / "models.pt"), str(tmp)), nprocs=WORLD, join=True)
    single = every_pass(models, fit, held)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return single, ranks, fit, held


def _shares(ids: list[int]) -> list[list[int]]:
    """Written out for 2 ranks: rank 0 walks the first ⌊n/2⌋ of the pass's n batches of BS ids, rank 1 the rest."""
    n = math.ceil(len(ids) / BS)
    return [ids[: (n // 2) * BS], ids[(n // 2) * BS:]]


def assert_walked_own_share(runs, kind: str, passes: list[list[int]]) -> None:
    """Each rank loaded exactly its contiguous share of every pass of ``kind`` (``passes``: the ids of each
    pass, in order), never another rank's image."""
    (_, seen), ranks = runs[0], runs[1]
    assert seen[kind] == [i for ids in passes for i in ids]  # the one-process pass loads everything once
    for r, (_, rank_seen) in enumerate(ranks):
        assert rank_seen[kind] == [i for ids in passes for i in _shares(ids)[r]], f"rank {r}"


def assert_close(x, y, path: str = "", rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """Nested results equal: tensors/arrays up to float rounding (integer and bool ones exactly), the rest ==."""
    if isinstance(x, dict):
        assert list(x) == list(y), path
        for k in x:
            assert_close(x[k], y[k], f"{path}/{k}", rtol, atol)
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), path
        for i, (u, v) in enumerate(zip(x, y)):
            assert_close(u, v, f"{path}[{i}]", rtol, atol)
    elif isinstance(x, torch.Tensor) or hasattr(x, "dtype"):
        u, v = torch.as_tensor(x), torch.as_tensor(y)
        if u.is_floating_point():
            scale = float(u.abs().max()) if u.numel() else 0.0
            torch.testing.assert_close(v, u, rtol=rtol, atol=atol * max(scale, 1.0), equal_nan=True, msg=path)
        else:
            assert torch.equal(u, v), path
    else:
        assert x == y, path


def _train_ids() -> list[int]:
    return list(range(len(load_digits("train"))))


def test_matching_statistics_equal_one_process(runs):
    (single, _), ranks = runs[0], runs[1]
    for out, _ in ranks:
        # permutations identical; correlations up to float32 rounding: each batch's cross products are float32
        # matmuls, which MKL may split over another number of threads in a rank than in the one process
        assert_close(single["matching"], out["matching"], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in single["matching"][0].values())
    assert_walked_own_share(runs, "matching", [_train_ids()])


def test_covariance_pass_equals_one_process(runs):
    (single, _), ranks = runs[0], runs[1]
    assert all(n > 0 and n % 1437 == 0 for n, _, _ in single["covariance"].values())  # images × positions
    for out, _ in ranks:
        assert_close(single["covariance"], out["covariance"], rtol=1e-5, atol=1e-6)  # counts exact; float32 products
    assert_walked_own_share(runs, "covariance", [_train_ids()])


def test_repair_and_reset_equal_one_process(runs):
    (single, _), ranks = runs[0], runs[1]
    assert single["extra_layers"]  # the residual net took the block-output rule (added layers + BN reset)
    for out, _ in ranks:
        assert out["extra_layers"] == single["extra_layers"]
        # float32 parameters and BatchNorm averages: equal up to float32 rounding; num_batches_tracked exactly
        assert_close(single["repair"], out["repair"], rtol=1e-5, atol=1e-6)
    assert_walked_own_share(runs, "repair", [_train_ids(), _train_ids()])


def test_evaluation_equals_one_process(runs):
    (single, _), ranks = runs[0], runs[1]
    for out, _ in ranks:
        (scores, (loss, acc)), (want, (want_loss, want_acc)) = out["evaluation"], single["evaluation"]
        assert acc == want_acc and math.isclose(loss, want_loss, rel_tol=1e-12)
        for name in want:
            assert scores[name]["accuracy"] == want[name]["accuracy"]
            assert math.isclose(scores[name]["loss"], want[name]["loss"], rel_tol=1e-12)
    test_ids = list(range(len(load_digits("test"))))
    assert_walked_own_share(runs, "evaluation", [test_ids, test_ids])


def test_regression_fit_and_topk_equal_one_process(runs):
    (single, _), ranks, fit, held = runs
    for out, _ in ranks:
        # the weights solve Σ_BB⁻¹ Σ_BA from float32 products that each rank groups and rounds its own way:
        # ~1e-7 of the scatter's scale, amplified by Σ_BB's condition number (2e-5 of the largest weight seen)
        assert_close(single["regression"], out["regression"], rtol=1e-4, atol=1e-4)
        assert_close(single["topk"], out["topk"])  # top-k ids exactly
    assert_walked_own_share(runs, "regression", [fit, held, held])


def test_a_rank_without_batches_gets_the_result(runs):
    (single, seen), ranks, _, held = runs
    (stats, block, tops, scores), (want_stats, want_block, want_tops, want_scores) = ranks[0][0]["one_batch"], \
        single["one_batch"]
    assert ranks[0][1]["one_batch"] == [] and ranks[1][1]["one_batch"] == seen["one_batch"]
    assert_close(want_stats, stats, rtol=1e-5, atol=1e-6)  # float32 products, another thread count
    assert_close(want_block, block, rtol=1e-5, atol=1e-6)
    assert_close(want_tops, tops)
    assert scores["a"]["accuracy"] == want_scores["a"]["accuracy"]


def test_torchrun_sweep_equals_one_process(trained_digits, tmp_path):
    from mergescope.cli import main
    from mergescope.train.checkpoint import save_checkpoint

    ckpts = []
    for seed in (0, 1):
        ckpts.append(str(tmp_path / f"m{seed}.safetensors"))
        save_checkpoint(ckpts[-1], trained_digits("cnn_digits", seed, width=16))
    args = ["sweep", *ckpts, "--data", "digits", "--quiet", "--batch-size", "100", "--alpha-step", "0.5",
            "--methods", "permuted", "permuted+repair", "permuted+reset", "cca"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                           "-m", "mergescope.cli", *args, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("report:") == 1  # only rank 0 prints

    def rows(run):
        with open(tmp_path / run / "interpolation.csv") as f:
            return list(csv.DictReader(f))

    one, two = rows("one"), rows("two")
    assert len(one) == len(two) > 0
    for r, s in zip(one, two):
        assert (r["method"], r["alpha"], r["split"], r["accuracy"]) == (s["method"], s["alpha"], s["split"],
                                                                       s["accuracy"])
        # RESET's float32 BatchNorm averages round differently when combined over ranks; the rest is bitwise
        assert math.isclose(float(r["loss"]), float(s["loss"]), rel_tol=1e-5), r

    # a folder rank 0 may not write (a finished run, no --overwrite): every rank stops at once, none waits in a pass
    before = (tmp_path / "two" / "interpolation.csv").read_bytes()
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                            "-m", "mergescope.cli", *args, "--out", str(tmp_path / "two")],
                           env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and again.stderr.count("already holds a run") == WORLD, again.stderr[-3000:]
    assert (tmp_path / "two" / "interpolation.csv").read_bytes() == before
