"""The command line end to end: the demo's run folder, and one-line errors for bad input."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from mergescope.cli import main
from mergescope.models import create_model
from mergescope.report import barriers, read_csv
from mergescope.train import save_checkpoint


@pytest.fixture
def demo_dir(demo_run):
    return demo_run


def test_demo_writes_a_complete_study_folder(demo_dir):
    for name in ("report.html", "stages.json", "study.json", "sweep/interpolation.csv", "sweep/manifest.json",
                 "sweep/results.json", "sweep/report.html", "features/probe/probe.safetensors",
                 "checkpoints/model_A.safetensors", "checkpoints/model_A.json", "checkpoints/model_C.safetensors",
                 "features/features/pair_features.2.html", "features/features/many_features.9.html",
                 "features/compare.csv", "features/regression.csv", "merge/merges.csv"):
        assert (demo_dir / name).is_file(), name
    assert list(json.loads((demo_dir / "stages.json").read_text())) == ["train", "sweep", "features", "compare",
                                                                          "regress", "merge"]
    manifest = json.loads((demo_dir / "sweep" / "manifest.json").read_text())
    assert set(manifest["sha256"]) >= {"interpolation.csv", "report.html", "alignment.safetensors"}
    assert manifest["environment"]["torch"] == torch.__version__
    assert [m["checkpoint"] for m in manifest["models"].values()] == [
        str(demo_dir / "checkpoints" / f"model_{t}.safetensors") for t in "AB"]
    rows = read_csv(demo_dir / "sweep" / "interpolation.csv")
    methods = {r["method"] for r in rows}
    assert methods == {"naive", "permuted", "permuted+repair", "permuted+reset", "cca+repair", "regression+repair"}
    assert len(rows) == 6 * 21 * 2  # methods × α × splits


def test_demo_compares_channels(demo_dir):
    from mergescope.compare import read_compare_csv

    rows = read_compare_csv(demo_dir / "features" / "compare.csv")
    assert len(rows) == 2 * (16 + 32 + 64)  # B and C aligned to A × every channel of the 3 layers (width 16)
    assert {r["embedder_kind"] for r in rows} == {"fallback"}
    results = json.loads((demo_dir / "features" / "results.json").read_text())
    assert [s["title"] for s in results["sections"]] == ["Feature visualization", "Channel comparison",
                                                         "Regression alignment"]
    partial = results["compare"]["partial_merge"]
    assert len({r["accuracy"] for r in partial if r["fraction"] == 1.0}) == 1  # every curve ends at the full merge
    assert (demo_dir / "features" / "features" / "table_features.9.html").is_file()


def test_demo_repair_beats_direct_average_at_midpoint(demo_dir):
    b = {(r["method"], r["split"]): r for r in barriers(read_csv(demo_dir / "sweep" / "interpolation.csv"))}
    assert b["permuted+repair", "test"]["midpoint_accuracy"] > b["naive", "test"]["midpoint_accuracy"] + 0.2
    assert b["permuted+repair", "test"]["loss_barrier"] < b["naive", "test"]["loss_barrier"]


def test_demo_merges_all_three_models(demo_dir):
    results = json.loads((demo_dir / "merge" / "results.json").read_text())
    many = results["many"]
    acc = {r["method"]: r["accuracy"] for r in many["rows"] if r["split"] == "test"}
    assert acc["permuted+repair"] > acc["naive"] + 0.5
    assert len(many["endpoints"]) == 3 * 2 and many["passes"]["repair/reset"] == 1  # 3 models × 2 splits
    assert (demo_dir / "merge" / "merges.csv").read_text().splitlines()[0] == "method,models,split,loss,accuracy"
    html = (demo_dir / "merge" / "report.html").read_text()
    assert "Merging 3 models" in html
    section = html[html.index("Merging 3 models"):]
    assert "<th>Corrects</th>" in section and many["corrections"]["permuted+repair"] in section
    assert "merges.csv" in json.loads((demo_dir / "merge" / "manifest.json").read_text())["sha256"]


def test_merge_command_writes_a_run_folder(demo_dir, tmp_path):
    ckpts = [str(demo_dir / "checkpoints" / f"model_{t}.safetensors") for t in "ABC"]
    out = tmp_path / "merge"
    assert main(["merge", *ckpts, "--data", "digits", "--out", str(out), "--quiet", "--methods", "naive",
                 "permuted+repair", "cca+repair"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["many"]["rows"]] == ["naive", "permuted+repair", "cca+repair"]
    demo = json.loads((demo_dir / "merge" / "results.json").read_text())["many"]
    assert [e["accuracy"] for e in results["many"]["endpoints"]] == [e["accuracy"] for e in demo["endpoints"]
                                                                      if e["split"] == "test"]
    demo_rows = {r["method"]: r for r in demo["rows"] if r["split"] == "test"}
    for r in results["many"]["rows"]:  # the same models and data: the same merges as the demo's
        assert r["accuracy"] == pytest.approx(demo_rows[r["method"]]["accuracy"], abs=0.006), r["method"]
    html = (out / "report.html").read_text()
    assert "Merging 3 models" in html and "cca+repair" in html
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert "Merging 3 models" in (out / "report.html").read_text()


def test_demo_rerun_reuses_every_stage_and_refuses_a_folder_that_is_not_a_study(demo_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["demo", "--out", str(demo_dir), "--quiet"]) == 0
    assert capsys.readouterr().out.count("stored result still valid") == 6
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(other), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "other than a mergescope study" in err and len(err.splitlines()) == 1
    assert (other / "notes.txt").read_text() == "mine"


def test_report_rerenders_from_stored_results(demo_dir):
    run = demo_dir / "features"
    (run / "report.html").unlink()
    page = run / "features" / "pair_features.5.html"
    page.unlink()
    assert main(["report", str(run)]) == 0
    assert "Channel comparison" in (run / "report.html").read_text()
    assert "B aligned to A" in page.read_text()  # rebuilt from the stored probe


def test_feature_pages_show_the_models_top_images(demo_dir):
    from mergescope.probe import load_probe

    probe = load_probe(demo_dir / "features" / "probe")
    ids = probe["A", "features.5"].topk_ids
    from mergescope.report.feature_data import decode, read_page_data

    shown, _ = decode(read_page_data(demo_dir / "features" / "features" / "pair_features.5.html"))
    assert shown["A"][0, 0] == int(ids[0, 0])  # channel 0's best image is the first tile


def _sweep(tmp_path, a, b, data="digits"):
    return main(["sweep", str(a), str(b), "--data", data, "--out", str(tmp_path / "sweep"), "--quiet",
                 "--alpha-step", "0.5"])


@pytest.fixture()
def checkpoints(tmp_path):
    paths = {}
    for name, arch in (("cnn", "cnn_digits"), ("cnn2", "cnn_digits"), ("mlp", "mlp")):
        paths[name] = tmp_path / f"{name}.safetensors"
        save_checkpoint(paths[name], create_model(arch, width=8, seed=0))
    return paths


def _assert_one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_sweep_of_two_architectures_is_refused(tmp_path, checkpoints, capsys):
    assert _sweep(tmp_path, checkpoints["cnn"], checkpoints["mlp"]) == 2
    _assert_one_line_error(capsys, "cannot align")
    assert not (tmp_path / "sweep").exists()  # nothing half-written


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path, checkpoints, capsys):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(checkpoints["cnn"].read_bytes()[:200])
    (tmp_path / "corrupt.json").write_text(checkpoints["cnn"].with_suffix(".json").read_text())
    assert _sweep(tmp_path, checkpoints["cnn"], corrupt) == 2
    _assert_one_line_error(capsys, "corrupt.safetensors")
    pickle_file = tmp_path / "model.safetensors"
    torch.save(create_model("cnn_digits", width=8).state_dict(), pickle_file)
    (tmp_path / "model.json").write_text(checkpoints["cnn"].with_suffix(".json").read_text())
    assert _sweep(tmp_path, checkpoints["cnn"], pickle_file) == 2
    _assert_one_line_error(capsys, "safetensors")


def test_checkpoint_that_does_not_fit_its_architecture_is_refused(tmp_path, checkpoints, capsys):
    side = json.loads(checkpoints["cnn2"].with_suffix(".json").read_text())
    side["arch"]["kwargs"]["width"] = 16  # the tensors are width 8
    checkpoints["cnn2"].with_suffix(".json").write_text(json.dumps(side))
    assert _sweep(tmp_path, checkpoints["cnn"], checkpoints["cnn2"]) == 2
    _assert_one_line_error(capsys, "shape")


def test_missing_dataset_is_refused(tmp_path, checkpoints, capsys):
    assert _sweep(tmp_path, checkpoints["cnn"], checkpoints["cnn2"], data=str(tmp_path / "nowhere")) == 2
    _assert_one_line_error(capsys, "nowhere")


def test_layers_lists_block_outputs(capsys):
    assert main(["layers", "--arch", "resnet20"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0 " in out and "layer3.2 " in out


def test_probe_merges_as_the_library_does(tmp_path, checkpoints):
    from mergescope.align import match_many
    from mergescope.data import iter_batches, load_digits
    from mergescope.studies.probe import merged_pair
    from mergescope.perm import build_spec
    from mergescope.probe import load_probe, state_sha256
    from mergescope.train import load_checkpoint

    other = tmp_path / "seed1.safetensors"
    save_checkpoint(other, create_model("cnn_digits", width=8, seed=1))
    out = tmp_path / "probe"
    assert main(["probe", str(checkpoints["cnn"]), str(other), "--data", "digits", "--out", str(out),
                 "--alpha", "0.3", "--k", "3", "--quiet", "--device", "cpu"]) == 0
    rows = json.loads((out / "results.json").read_text())["features"]["views"][0]["rows"]
    assert rows["merged + REPAIR (α=0.3)"] == "merged_1"
    (a, _), (b, _) = load_checkpoint(checkpoints["cnn"]), load_checkpoint(other)
    data = load_digits("train")
    spec = build_spec(a)
    [match] = match_many(a, [b], spec, iter_batches(data, 256))
    merged = merged_pair(a, b, spec, match.perms, data, 0.3)
    stored = load_probe(out / "probe").config["models"]
    for key, method in (("merged_0", "permuted"), ("merged_1", "permuted+repair"), ("merged_2", "naive")):
        assert stored[key]["state_sha256"] == state_sha256(merged[method]), method


@pytest.mark.parametrize("user, policy", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_cli_makes_openmp_wait_passively_unless_told_otherwise(user, policy):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # conftest set it for this process
    env |= {"OMP_DISPLAY_ENV": "VERBOSE"} | ({"OMP_WAIT_POLICY": user} if user else {})
    code = "import os, mergescope.cli; print(os.environ['OMP_WAIT_POLICY'])"  # mergescope.cli imports torch
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == policy
    if "OPENMP DISPLAY ENVIRONMENT" not in run.stderr:
        pytest.skip("torch's OpenMP runtime is not libgomp: cannot see the policy it read")
    spins = set(re.findall(r"GOMP_SPINCOUNT = '(\d+)'", run.stderr))  # what libgomp read when torch loaded it
    assert spins and (spins == {"0"}) == (policy == "PASSIVE"), spins  # passive: no spinning at all


def test_train_refuses_to_replace_a_checkpoint_and_to_call_training_images_test(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    args = ["train", "--arch", "mlp", "--arch-kwargs", '{"width": 8, "depth": 1}', "--data", "digits", "--epochs", "1",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    before = out.read_bytes()
    assert main(args) == 2
    _assert_one_line_error(capsys, "--out", "--overwrite")
    assert out.read_bytes() == before
    assert main([*args, "--overwrite", "--seed", "1"]) == 0 and out.read_bytes() != before
    tree = tmp_path / "tree"  # a plain ImageFolder tree: no test split of its own
    for label in ("a", "b"):
        (tree / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tree / label / f"{i}.png")
    assert main(["train", "--arch", "mlp", "--data", str(tree), "--eval", "--epochs", "1",
                 "--out", str(tmp_path / "t.safetensors"), "--quiet"]) == 2
    _assert_one_line_error(capsys, "--eval", "test split")
    assert not (tmp_path / "t.safetensors").exists()


def test_demo_stores_its_alignments_and_judges_the_correlation_against_its_null(demo_dir):
    import numpy as np

    from mergescope.align.store import load_alignments
    from mergescope.compare import read_compare_csv

    run = demo_dir / "features"
    manifest = json.loads((run / "manifest.json").read_text())
    assert "alignment.safetensors" in manifest["sha256"]
    html = (run / "report.html").read_text()
    assert "Observation 1" in html and "&amp;gt;" not in html and "&amp;lt;" not in html  # thresholds once escaped
    rows = read_compare_csv(run / "compare.csv")
    for tag in ("B", "C"):
        matrices = load_alignments(run / "alignment.safetensors").correlations(tag)
        assert set(matrices) == {"features.2", "features.5", "features.9"}
        for layer, matrix in matrices.items():
            mine = [r for r in rows if r["model"] == f"{tag}_aligned" and r["layer"] == layer]
            diag = np.diagonal(matrix)[[int(r["channel"]) for r in mine]]  # the matched pairs
            assert np.allclose(diag, [float(r["correlation"]) for r in mine], atol=1e-5)
            assert all(r["similar_correlation"] in ("true", "false", True, False) for r in mine)
            assert len({r["null_threshold_correlation"] for r in mine}) == 1  # one threshold per layer
