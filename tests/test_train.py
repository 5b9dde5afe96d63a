"""Training and checkpoints: digits accuracy, determinism, safetensors round trips and their error messages."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mergescope.data import InMemoryDataset, load_digits
from mergescope.errors import CheckpointError, MergescopeError
from mergescope.models import create_model, model_config
from mergescope.train import (
    TrainConfig,
    evaluate_model,
    get_schedule,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
    sidecar_path,
    train_model,
)


@pytest.fixture
def one_thread():
    """Tiny models train faster (and undisturbed by other processes) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits_train():
    return load_digits("train")


@pytest.fixture(scope="module")
def digits_test():
    return load_digits("test")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- training ----

DIGITS_CFG = dict(epochs=4, batch_size=64, lr=0.1, seed=0)


def test_cnn_digits_learns_and_is_deterministic(digits_train, digits_test, one_thread):
    global_state = torch.random.get_rng_state()
    runs = []
    for seed in (0, 0, 1):
        model = create_model("cnn_digits", width=16, seed=0)
        metrics = train_model(model, digits_train, TrainConfig(**{**DIGITS_CFG, "seed": seed}), digits_test,
                              progress=False)
        runs.append((model, metrics))
    (m0, r0), (m1, r1), (m2, _) = runs
    assert r0["test_acc"] >= 0.90, r0
    assert r0["final_train_acc"] >= 0.95
    untimed = [[{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]] for r in (r0, r1)]
    assert same_weights(m0, m1) and untimed[0] == untimed[1]
    assert not same_weights(m0, m2)  # a different seed shuffles differently
    assert torch.equal(torch.random.get_rng_state(), global_state)
    assert [h["epoch"] for h in r0["history"]] == [1, 2, 3, 4]
    assert r0["history"][-1]["train_loss"] < r0["history"][0]["train_loss"]
    assert r0["steps"] == 4 * (len(digits_train) // 64)
    assert not m0.training


def test_augmentation_and_dropout_are_seeded(one_thread):
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (48,), generator=gen)  # [48]
    pixels = torch.randint(0, 120, (48, 32, 32, 3), generator=gen) + 60 * y[:, None, None, None]  # class-shifted
    ds = InMemoryDataset(pixels.to(torch.uint8), y.numpy(), ["a", "b", "c"], (0.5,) * 3, (0.25,) * 3)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.02, augment=True, schedule="cosine", seed=5)
    models = [create_model("alexnet_cifar", width=0.125, num_classes=3, seed=0) for _ in range(2)]
    results = [train_model(m, ds, cfg, progress=False) for m in models]
    assert same_weights(*models)
    assert results[0]["final_train_acc"] == results[1]["final_train_acc"]
    assert len(results[0]["history"]) == 2 and "test_acc" not in results[0]


def test_train_on_subset_ids_and_progress_bar(digits_train, one_thread):
    model = create_model("mlp", width=32, depth=1, seed=0)
    ids = torch.arange(100)
    metrics = train_model(model, digits_train, TrainConfig(epochs=1, batch_size=32, lr=0.05), ids=ids, progress=True)
    assert metrics["steps"] == 100 // 32
    assert 0.0 <= metrics["final_train_acc"] <= 1.0


def test_evaluate_model_restores_mode(digits_test):
    model = create_model("mlp", seed=0).train()
    loss, acc = evaluate_model(model, digits_test, batch_size=100)
    assert model.training
    assert loss > 0 and 0 <= acc <= 1
    assert acc < 0.5  # untrained


def test_train_config_validation():
    with pytest.raises(MergescopeError, match="unknown lr schedule 'linear'.*onecycle"):
        TrainConfig(schedule="linear")
    with pytest.raises(MergescopeError, match="epochs >= 1"):
        TrainConfig(epochs=0)
    cfg = TrainConfig(schedule="step", milestones=(0.3, 0.6))
    assert TrainConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_schedules():
    total, warm = 100, 20
    onecycle = [get_schedule("onecycle")(s, total, warm, (), 0.1) for s in range(total)]
    assert onecycle[0] == pytest.approx(1 / warm) and onecycle[warm - 1] == 1.0
    assert all(a > b for a, b in zip(onecycle[warm:], onecycle[warm + 1:])) and onecycle[-1] < 0.02
    cosine = [get_schedule("cosine")(s, total, 0, (), 0.1) for s in range(total)]
    assert cosine[0] == 1.0 and cosine[50] == pytest.approx(0.5) and cosine[-1] < 0.01
    step = [get_schedule("step")(s, total, 0, (0.5, 0.75), 0.1) for s in range(total)]
    assert step[49] == 1.0 and step[50] == pytest.approx(0.1) and step[75] == pytest.approx(0.01)


# ---- checkpoints ----

ROUND_TRIP = [
    ("mlp", {}, (2, 1, 8, 8)),
    ("cnn_digits", {"width": 8}, (2, 1, 8, 8)),
    ("resnet20", {"width": 0.5}, (2, 3, 32, 32)),
    ("vgg11_bn", {"width": 0.25}, (2, 3, 32, 32)),
    ("alexnet_cifar", {"width": 0.25}, (2, 3, 32, 32)),
]


@pytest.mark.parametrize("name,kwargs,shape", ROUND_TRIP, ids=[r[0] for r in ROUND_TRIP])
def test_checkpoint_round_trip(tmp_path, name, kwargs, shape):
    model = create_model(name, seed=0, **kwargs)
    x = torch.randn(*shape)
    model.train()
    model(torch.randn(8, *shape[1:]))  # move BatchNorm running stats off their defaults
    model.eval()
    meta = {"seed": 7, "metrics": {"test_acc": 0.5}, "dataset": "abc123", "config": TrainConfig(epochs=3).to_dict()}
    path = tmp_path / "run" / "model.safetensors"
    side = save_checkpoint(path, model, meta)
    assert side == sidecar_path(path) == tmp_path / "run" / "model.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"]  # no temp files
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta == meta
    assert model_config(loaded) == model_config(model)
    assert same_weights(loaded, model) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    info = read_checkpoint_info(path)
    assert info["arch"] == {"name": name, "kwargs": model_config(model)["kwargs"]}
    assert info["mergescope_version"] and info["format"] == "mergescope-checkpoint"


def test_checkpoint_meta_conversions(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, create_model("mlp"), {"config": TrainConfig(), "acc": np.float32(0.5), "dir": tmp_path})
    _, meta = load_checkpoint(path)
    assert meta["config"]["lr"] == 0.1 and meta["acc"] == 0.5 and meta["dir"] == str(tmp_path)
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "bad.safetensors", create_model("mlp"), {"x": object()})
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.fixture
def saved_vgg(tmp_path):
    path = tmp_path / "vgg.safetensors"
    save_checkpoint(path, create_model("vgg11", width=0.25, seed=0), {"seed": 0})
    return path


def assert_one_line(exc_info, *fragments):
    message = str(exc_info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "absent.safetensors")
    assert_one_line(exc, "not found", "absent.safetensors")


@pytest.mark.parametrize("damage", ["random", "truncated", "empty", "text"])
def test_damaged_checkpoint(saved_vgg, damage):
    good = saved_vgg.read_bytes()
    bad = {
        "random": np.random.default_rng(0).bytes(4096),
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "text": b"this is not a safetensors file at all" * 10,
    }[damage]
    saved_vgg.write_bytes(bad)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(saved_vgg)
    assert_one_line(exc, "not a readable safetensors file", str(saved_vgg))


def test_wrong_architecture_names_the_first_bad_key(saved_vgg):
    # the mix-up recorded in the sidecar
    side = sidecar_path(saved_vgg)
    info = json.loads(side.read_text())
    info["arch"] = {"name": "resnet20", "kwargs": {}}
    side.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="does not fit architecture 'resnet20'"):
        load_checkpoint(saved_vgg)
    # the same mix-up given explicitly for a file without a sidecar
    side.unlink()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(saved_vgg, arch="resnet20")
    assert_one_line(exc, "does not fit architecture 'resnet20'", "missing tensor 'conv1.weight'", "unexpected tensor '")
    assert re.search(r"unexpected tensor '(features|classifier)\.\d*\.?(weight|bias)'", str(exc.value))


def test_wrong_width_names_both_shapes(saved_vgg):
    sidecar_path(saved_vgg).unlink()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(saved_vgg, arch="vgg11", arch_kwargs={"width": 0.5})
    assert_one_line(exc, "tensor 'features.0.weight'", "(16, 3, 3, 3) in the checkpoint", "(32, 3, 3, 3) in the model")


def test_missing_sidecar(saved_vgg):
    sidecar_path(saved_vgg).unlink()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(saved_vgg)
    assert_one_line(exc, "sidecar", "missing", "--arch NAME")
    model, meta = load_checkpoint(saved_vgg, arch="vgg11", arch_kwargs={"width": 0.25})
    assert meta == {} and model_config(model)["kwargs"]["width"] == 0.25


def test_corrupt_sidecar(saved_vgg):
    sidecar_path(saved_vgg).write_text("{not json")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(saved_vgg)
    assert_one_line(exc, "not valid JSON")


def test_foreign_safetensors_without_buffers(tmp_path):
    """A state dict lacking BatchNorm's num_batches_tracked still loads (torch tolerates it too)."""
    model = create_model("cnn_digits", width=4, seed=0)
    path = tmp_path / "foreign.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    loaded, _ = load_checkpoint(path, arch="cnn_digits", arch_kwargs={"width": 4})
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)
