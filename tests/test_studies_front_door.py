"""The thesis's own setting through the CLI: raw torchvision state-dict files (``torch.save(model.state_dict())``,
random init) with ``--arch`` go through probe, sweep and merge, and give exactly what the same weights give as
mergescope checkpoints (safetensors + sidecar); the stored alignment names the checkpoints it aligned."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mergescope.align.store import load_alignments
from mergescope.cli import main
from mergescope.models import create_model
from mergescope.probe import load_probe
from mergescope.train import checkpoint_sha256, save_checkpoint

CLASSES = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder tree of real JPEGs (64×64 smooth random images) with train/ and test/."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for c in range(CLASSES):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(small).resize((64, 64), Image.BILINEAR).save(d / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module", params=["tv_alexnet", "tv_resnet18"])
def pair(request, tmp_path_factory):
    """Two random-init models of ``arch`` as raw .pth state dicts and as mergescope checkpoints."""
    arch, out = request.param, tmp_path_factory.mktemp(request.param)
    raw, ours = [], []
    for seed in (0, 1):
        model = create_model(arch, num_classes=CLASSES, seed=seed)
        torch.save(model.state_dict(), out / f"m{seed}.pth")
        save_checkpoint(out / f"m{seed}.safetensors", model)
        raw.append(str(out / f"m{seed}.pth"))
        ours.append(str(out / f"m{seed}.safetensors"))
    return arch, raw, ours, out


def _run(args: list[str]) -> None:
    assert main([*args, "--quiet", "--device", "cpu"]) == 0


def test_probe_of_raw_state_dicts_equals_probe_of_checkpoints(folder, pair):
    arch, raw, ours, out = pair
    common = ["--data", str(folder), "--k", "3", "--subset-images", "12", "--batch-size", "12"]
    _run(["probe", *raw, "--arch", arch, "--out", str(out / "probe_raw"), *common])
    _run(["probe", *ours, "--out", str(out / "probe_ours"), *common])
    a, b = load_probe(out / "probe_raw" / "probe"), load_probe(out / "probe_ours" / "probe")
    assert a.models == b.models and a.layers == b.layers
    for model, layers in a.layers.items():
        for layer in layers:
            assert torch.equal(a[model, layer].topk_ids, b[model, layer].topk_ids)
            assert torch.equal(a[model, layer].topk_values, b[model, layer].topk_values)
    assert all(name.startswith(("features", "layer", "relu")) for name in a.layers["A"]), a.layers["A"]
    stored = load_alignments(out / "probe_raw" / "alignment.safetensors")
    assert stored.models["B"]["sha256"] == checkpoint_sha256(raw[1])
    assert stored.reference_source["sha256"] == checkpoint_sha256(raw[0])
    manifest = json.loads((out / "probe_raw" / "manifest.json").read_text())
    assert manifest["config"]["arch"] == arch and "probe/probe.safetensors" in manifest["sha256"]


def test_sweep_and_merge_of_raw_state_dicts_equal_those_of_checkpoints(folder, pair):
    arch, raw, ours, out = pair
    sweep = ["--data", str(folder), "--alpha-step", "0.5", "--methods", "naive", "permuted+repair",
             "--batch-size", "12"]
    _run(["sweep", *raw, "--arch", arch, "--out", str(out / "sweep_raw"), *sweep])
    _run(["sweep", *ours, "--out", str(out / "sweep_ours"), *sweep])
    assert (out / "sweep_raw" / "interpolation.csv").read_bytes() == \
        (out / "sweep_ours" / "interpolation.csv").read_bytes()
    merge = ["--data", str(folder), "--methods", "naive", "permuted", "--batch-size", "12"]
    _run(["merge", *raw, "--arch", arch, "--out", str(out / "merge_raw"), *merge])
    _run(["merge", *ours, "--out", str(out / "merge_ours"), *merge])
    assert (out / "merge_raw" / "merges.csv").read_bytes() == (out / "merge_ours" / "merges.csv").read_bytes()


def test_an_arch_that_disagrees_with_the_sidecar_is_refused(folder, pair, capsys):
    arch, _, ours, out = pair
    other = "tv_resnet18" if arch == "tv_alexnet" else "tv_alexnet"
    assert main(["probe", *ours, "--arch", other, "--data", str(folder), "--out", str(out / "refused"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and other in err and arch in err
    assert not (out / "refused").exists()
