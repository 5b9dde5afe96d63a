"""``mergescope bench-merge`` end to end on the digits (tiny widths, 1-2 epochs), the workloads it trains, and the
merge plan running the registry's combining methods (``mergescope merge --base`` and its one-line errors)."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from mergescope.cli import main
from mergescope.data import open_dataset
from mergescope.data.splits import stratified_subset
from mergescope.errors import MergescopeError
from mergescope.merge.methods import AlignInputs, get_merge_method
from mergescope.perm import build_spec
from mergescope.studies.bench_merge import CSV_COLUMNS
from mergescope.studies.merge import MergeConfig, run as merge_run
from mergescope.train import checkpoint_sha256, load_checkpoint, read_checkpoint_info

METHODS = ["logit_ensemble", "prob_ensemble+repair", "naive", "fedavg", "greedy_soup", "ties", "regmean",
           "permuted+repair", "permuted>ties"]
WORKLOADS = ["seeds", "halves_finetune"]
ARGS = ["--data", "digits", "--arch", "cnn_digits", "--arch-kwargs", '{"width": 4}', "--epochs", "2",
        "--finetune-epochs", "1", "--holdout", "60", "--quiet"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    assert main(["bench-merge", *ARGS, "--workloads", *WORKLOADS, "--methods", *METHODS, "--out", str(out)]) == 0
    with open(out / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, rows, json.loads((out / "results.json").read_text())


def _accuracy(model, ds, classes=None) -> float:
    """Accuracy by hand: argmax over all logits on the test images whose label is in ``classes`` (None: all)."""
    x, y = ds.get_batch(torch.arange(len(ds)))
    keep = torch.ones(len(y), dtype=torch.bool) if classes is None else torch.isin(y, torch.tensor(classes))
    with torch.no_grad():
        pred = model.eval()(x[keep]).argmax(1)
    return (pred == y[keep]).double().mean().item()


def test_bench_table_has_every_column_method_and_workload(bench):
    out, rows, results = bench
    assert tuple(rows[0]) == CSV_COLUMNS
    for w in WORKLOADS:
        got = [r["method"] for r in rows if r["workload"] == w and r["family"] != "input"]
        assert got == METHODS
        assert sum(r["family"] == "input" for r in rows if r["workload"] == w) == 2
    seeds = {r["method"]: r for r in rows if r["workload"] == "seeds"}
    assert seeds["ties"]["accuracy"] == "" and "needs a shared base" in seeds["ties"]["note"]
    assert "takes no fix" in seeds["prob_ensemble+repair"]["note"]
    ft = {r["method"]: r for r in rows if r["workload"] == "halves_finetune"}
    assert float(ft["ties"]["accuracy"]) > 0.5 and ft["ties"]["batchnorm"] == "carry"
    assert ft["logit_ensemble"]["forward_passes"] == "2" and ft["naive"]["forward_passes"] == "1"
    assert int(ft["logit_ensemble"]["parameters"]) == 2 * int(ft["naive"]["parameters"])
    assert ft["regmean"]["data_passes"] == "2" and ft["greedy_soup"]["heldout_passes"] == "3"
    assert ft["permuted+repair"]["data_passes"] == "2" and ft["permuted+repair"]["batchnorm"] == "repair"
    assert results["bench"]["reading"].startswith("Reading the table") and "halves_finetune" in results["headline"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"bench.csv", "results.json", "report.html", "figures/bench_seeds.svg",
            "checkpoints/base.safetensors"} <= set(manifest["sha256"])
    assert (out / "report.html").read_text().count("<img") == len(WORKLOADS)


def test_per_subset_accuracy_is_on_those_classes_test_images(bench):
    """The row's subset accuracies against a hand computation: an input model, and the naive merge built by hand
    (the mean of the two state dicts)."""
    out, rows, _ = bench
    test = open_dataset("digits", split="test")
    ft = {r["method"]: r for r in rows if r["workload"] == "halves_finetune"}
    m0, _ = load_checkpoint(out / "checkpoints" / "halves_finetune" / "0.safetensors")
    m1, _ = load_checkpoint(out / "checkpoints" / "halves_finetune" / "1.safetensors")
    row0 = next(r for m, r in ft.items() if m.startswith("model 0"))
    assert row0["subset_a"] == "classes 0-4" and row0["subset_b"] == "classes 5-9"
    assert float(row0["accuracy_a"]) == pytest.approx(_accuracy(m0, test, [0, 1, 2, 3, 4]), abs=1e-9)
    assert float(row0["accuracy_b"]) == pytest.approx(_accuracy(m0, test, [5, 6, 7, 8, 9]), abs=1e-9)
    assert float(row0["accuracy"]) == pytest.approx(_accuracy(m0, test), abs=1e-9)
    s0, s1 = m0.state_dict(), m1.state_dict()
    mean = {k: (s0[k].double() + s1[k].double()).div(2).to(s0[k].dtype) if s0[k].is_floating_point() else s0[k]
            for k in s0}
    m0.load_state_dict(mean)
    assert float(ft["naive"]["accuracy_b"]) == pytest.approx(_accuracy(m0, test, [5, 6, 7, 8, 9]), abs=1e-9)
    assert float(ft["naive"]["accuracy_a"]) != pytest.approx(float(ft["naive"]["accuracy_b"]), abs=1e-6)


def test_evaluation_passes_are_shared_by_every_model_of_a_workload(bench):
    _, _, results = bench
    for w in WORKLOADS:
        passes = results["bench"]["workloads"][w]["passes"]
        assert passes["evaluation"] == 1 and passes["matching"] == 1 and passes["repair/reset"] == 1
    ft = results["bench"]["workloads"]["halves_finetune"]["passes"]
    assert ft["method data"] == 2 and ft["held-out"] == 3  # RegMean: one per model; greedy soup: 2 + 1


def test_fine_tunes_start_from_the_base(bench):
    out, _, _ = bench
    ck = out / "checkpoints"
    base, _ = load_checkpoint(ck / "base.safetensors")
    ft, _ = load_checkpoint(ck / "halves_finetune" / "1.safetensors")
    seed, _ = load_checkpoint(ck / "seeds" / "0.safetensors")
    meta = read_checkpoint_info(ck / "halves_finetune" / "1.safetensors")["meta"]
    assert meta["init"]["sha256"] == checkpoint_sha256(ck / "base.safetensors")
    train = open_dataset("digits")
    heldout = set(stratified_subset(train.targets, 60, seed=0).tolist())  # the workloads' --holdout 60
    expected = [i for i, y in enumerate(train.targets.tolist()) if y >= 5 and i not in heldout]
    assert meta["classes"] == [5, 6, 7, 8, 9] and meta["examples"] == len(expected)

    def distance(a, b) -> float:
        sa, sb = a.state_dict(), b.state_dict()
        num = sum((sa[k] - sb[k]).double().norm() ** 2 for k in sa if sa[k].is_floating_point() and "running" not in k)
        den = sum(sa[k].double().norm() ** 2 for k in sa if sa[k].is_floating_point() and "running" not in k)
        return float((num / den).sqrt())

    assert 0 < distance(base, ft) < 0.35 * distance(base, seed)


def test_merge_cli_runs_task_vectors_from_base_and_names_a_missing_input(bench, tmp_path, capsys):
    out, _, _ = bench
    ck = out / "checkpoints"
    fts = [str(ck / "halves_finetune" / f"{i}.safetensors") for i in range(2)]
    code = main(["merge", *fts, "--data", "digits", "--methods", "ties", "--out", str(tmp_path / "m"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --methods ties needs --base CKPT (the shared base the models were " \
                                "fine-tuned from)\n" and not (tmp_path / "m").exists()
    code = main(["merge", *fts, "--data", "digits", "--methods", "greedy_soup", "--out", str(tmp_path / "m")])
    assert code == 2 and "--heldout-split SPLIT" in capsys.readouterr().err
    assert main(["merge", *fts, "--data", "digits", "--methods", "ties", "fedavg", "--base",
                 str(ck / "base.safetensors"), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    results = json.loads((tmp_path / "m" / "results.json").read_text())
    got = {r["method"]: r["accuracy"] for r in results["many"]["rows"]}
    models = [load_checkpoint(p)[0] for p in fts]
    base = load_checkpoint(ck / "base.safetensors")[0]
    test = open_dataset("digits", split="test")
    spec = build_spec(models[0], test.get_batch(torch.arange(4))[0])
    ties = get_merge_method("ties").merge(AlignInputs(models, spec, base=base))
    assert got["ties"] == pytest.approx(_accuracy(ties, test), abs=1e-9)
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["config"]["merge"]["sample_counts"] == \
        [read_checkpoint_info(p)["meta"]["examples"] for p in fts]


def test_merge_plan_counts_the_passes_of_combining_methods(bench):
    out, _, _ = bench
    ck = out / "checkpoints"
    models = [load_checkpoint(ck / "seeds" / f"{i}.safetensors")[0] for i in range(2)]
    train = open_dataset("digits")
    res = merge_run(models, train, {}, MergeConfig(["fisher", "swa", "greedy_soup", "naive"], stats_ids=range(64)),
                    heldout=open_dataset("digits", split="test"))
    assert res.passes == {"matching": 0, "repair/reset": 0, "evaluation": 0, "method data": 3, "held-out": 3}
    with pytest.raises(MergescopeError, match="^greedy_soup needs MergePlan.heldout, which is not given$"):
        merge_run(models, train, {}, MergeConfig(["greedy_soup"]))
    with pytest.raises(MergescopeError, match="^'permuted>mergemany': the part after '>' must be an aggregation"):
        merge_run(models, train, {}, MergeConfig(["permuted>mergemany"]))


def test_the_reading_is_computed_from_the_rows():
    from mergescope.report.bench_pages import read_table

    def row(w, method, family, acc, loss=1.0):
        return {"workload": w, "method": method, "family": family, "split": "test", "accuracy": acc, "loss": loss,
                "accuracy_a": acc, "accuracy_b": acc}

    rows = [row("w1", "model 0 (a)", "input", 0.8), row("w1", "logit_ensemble", "ensemble", 0.9),
            row("w1", "permuted+repair", "alignment", 0.7), row("w1", "ties", "aggregation", 0.5),
            row("w2", "model 0 (a)", "input", 0.6, 0.3), row("w2", "greedy_soup", "aggregation", 0.6, 0.3),
            row("w2", "zipit+repair", "map", 0.4), row("w2", "regmean", "aggregation", 0.45)]
    text = read_table(rows)
    assert "on w1, neuron alignment wins among the merges (permuted+repair, 70.0%, 10.0 points below the best " \
           "single model, 20.0 points short of the logit_ensemble; best of weight aggregation 50.0%)" in text
    assert "on w2, weight aggregation wins among the merges (regmean, 45.0%" in text
    assert "greedy_soup returned one of the input models" in text
    assert text.endswith("Overall: neuron alignment on 1 of 2 workloads (w1); weight aggregation on 1 of 2 "
                         "workloads (w2).")


def test_the_command_line_restates_the_bench_defaults(tmp_path, capsys):
    from mergescope.cli import parser
    from mergescope.studies import bench_merge

    assert parser.BENCH_METHODS == bench_merge.DEFAULT_METHODS and parser.BENCH_WORKLOADS == \
        bench_merge.DEFAULT_WORKLOADS
    assert main(["bench-merge", *ARGS, "--workloads", "seed", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == "error: unknown workload 'seed'; known: seeds, halves, halves_finetune, " \
                                      "stratified_finetune, hparams, checkpoints\n" and not (tmp_path / "b").exists()
