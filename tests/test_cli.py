"""The command line end to end: the demo's run folder, and one-line errors for bad input."""
import json

import pytest
import torch

from mergescope.cli import main
from mergescope.models import create_model
from mergescope.report import barriers, read_csv
from mergescope.train import save_checkpoint


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    return out


def test_demo_writes_a_complete_run_folder(demo_dir):
    for name in ("report.html", "interpolation.csv", "manifest.json", "results.json", "probe/probe.safetensors",
                 "checkpoints/model_A.safetensors", "checkpoints/model_A.json", "checkpoints/model_C.safetensors",
                 "features/pair_features.2.html", "features/many_features.9.html"):
        assert (demo_dir / name).is_file(), name
    manifest = json.loads((demo_dir / "manifest.json").read_text())
    assert manifest["config"]["demo"]["seeds"] == [0, 1, 2]
    assert set(manifest["sha256"]) >= {"interpolation.csv", "report.html", "checkpoints/model_A.safetensors"}
    assert manifest["environment"]["torch"] == torch.__version__
    rows = read_csv(demo_dir / "interpolation.csv")
    methods = {r["method"] for r in rows}
    assert methods == {"naive", "permuted", "permuted+repair", "permuted+reset"}
    assert len(rows) == 4 * 21 * 2  # methods × α × splits


def test_demo_compares_channels(demo_dir):
    from mergescope.compare import read_compare_csv

    rows = read_compare_csv(demo_dir / "compare.csv")
    assert len(rows) == 2 * (16 + 32 + 64)  # B and C aligned to A × every channel of the 3 layers (width 16)
    assert {r["embedder_kind"] for r in rows} == {"fallback"}
    results = json.loads((demo_dir / "results.json").read_text())
    assert [s["title"] for s in results["sections"]] == ["Feature visualization", "Channel comparison"]
    partial = results["compare"]["partial_merge"]
    assert len({r["accuracy"] for r in partial if r["fraction"] == 1.0}) == 1  # every curve ends at the full merge
    assert (demo_dir / "features" / "table_features.9.html").is_file()


def test_demo_repair_beats_direct_average_at_midpoint(demo_dir):
    b = {(r["method"], r["split"]): r for r in barriers(read_csv(demo_dir / "interpolation.csv"))}
    assert b["permuted+repair", "test"]["midpoint_accuracy"] > b["naive", "test"]["midpoint_accuracy"] + 0.2
    assert b["permuted+repair", "test"]["loss_barrier"] < b["naive", "test"]["loss_barrier"]


def test_demo_refuses_to_overwrite_a_finished_run(demo_dir, capsys):
    assert main(["demo", "--out", str(demo_dir), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "already holds a run" in err and len(err.splitlines()) == 1


def test_report_rerenders_from_stored_results(demo_dir):
    (demo_dir / "report.html").unlink()
    page = demo_dir / "features" / "pair_features.5.html"
    page.unlink()
    assert main(["report", str(demo_dir)]) == 0
    assert "permuted+repair" in (demo_dir / "report.html").read_text()
    assert "B aligned to A" in page.read_text()  # rebuilt from the stored probe


def test_feature_pages_show_the_models_top_images(demo_dir):
    from mergescope.probe import load_probe

    probe = load_probe(demo_dir / "probe")
    ids = probe["A", "features.5"].topk_ids
    html = (demo_dir / "features" / "pair_features.5.html").read_text()
    first = html.index('id="c0"')
    assert f"image {int(ids[0, 0])} " in html[first:first + 4000]  # channel 0's best image is the first tile


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
