"""The model zoo: registry, shapes, fx-traceability, seeding, torchvision adapters."""

import pytest
import torch
import torch.fx
from safetensors.torch import save_file

from mergescope.errors import ArchitectureError, CheckpointError
from mergescope.models import create_model, list_models, load_state_dict_file, model_config, register_model

DIGIT_MODELS = {"mlp", "cnn_digits"}
EXPECTED = {
    "mlp", "cnn_digits", "vgg11", "vgg11_bn", "resnet20", "alexnet_cifar",
    "tv_alexnet", "tv_vgg11", "tv_vgg11_bn", "tv_resnet18", "tv_resnet50",
}


def input_shape(name: str) -> tuple[int, ...]:
    """A batch that fits the architecture: 1x8x8 digits, 3x64x64 for torchvision, 3x32x32 for CIFAR models."""
    if name in DIGIT_MODELS:
        return (3, 1, 8, 8)
    if name.startswith("tv_"):
        return (3, 3, 64, 64)
    return (3, 3, 32, 32)


def test_registry_lists_the_zoo():
    assert EXPECTED <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ArchitectureError, match="unknown model 'resnet21'.*resnet20") as exc:
        create_model("resnet21")
    assert "\n" not in str(exc.value)


def test_unknown_argument_is_an_architecture_error():
    with pytest.raises(ArchitectureError, match="no argument.*depthh"):
        create_model("mlp", depthh=2)
    with pytest.raises(ArchitectureError, match="width to be a number > 0"):
        create_model("resnet20", width=0)


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_fx_trace(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(*input_shape(name))
    with torch.no_grad():
        out = model(x)  # [B, 7]
        traced = torch.fx.symbolic_trace(model)
        traced_out = traced(x)
    assert out.shape == (x.shape[0], 7)
    assert torch.isfinite(out).all()
    assert torch.equal(out, traced_out)
    cfg = model_config(model)
    assert cfg["name"] == name and cfg["kwargs"]["num_classes"] == 7
    assert "weights_path" not in cfg["kwargs"]


def test_recorded_kwargs_rebuild_the_same_architecture():
    model = create_model("vgg11_bn", width=0.25, num_classes=5)
    cfg = model_config(model)
    assert cfg == {"name": "vgg11_bn", "kwargs": {"num_classes": 5, "in_channels": 3, "width": 0.25}}
    rebuilt = create_model(cfg["name"], **cfg["kwargs"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_register_model_records_all_but_transient_kwargs(monkeypatch):
    from mergescope.models import _registry

    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))  # keep the real registry clean

    @register_model("toy", transient=("init_scale",))
    def toy(num_classes: int = 10, in_channels: int = 3, hidden: int = 4, init_scale: float = 1.0):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels, hidden))

    model = create_model("toy", hidden=6, init_scale=0.5)
    assert model_config(model) == {"name": "toy", "kwargs": {"num_classes": 10, "in_channels": 3, "hidden": 6}}
    assert "toy" in list_models()
    with pytest.raises(ArchitectureError, match="registered twice"):
        register_model("toy")(toy)


def test_model_config_rejects_foreign_models():
    with pytest.raises(ArchitectureError, match="not built by"):
        model_config(torch.nn.Linear(2, 2))


def test_width_multiplier_scales_channels():
    thin = create_model("resnet20", width=1)
    wide = create_model("resnet20", width=2)
    assert thin.fc.in_features == 64 and wide.fc.in_features == 128
    assert create_model("vgg11", width=0.5).classifier.in_features == 256
    assert create_model("cnn_digits", width=8).classifier.in_features == 8 * 4 * 4


def test_batchnorm_switch():
    with_bn = create_model("cnn_digits")
    without = create_model("cnn_digits", batchnorm=False)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in without.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in create_model("alexnet_cifar", width=0.25).modules())


def test_seeded_creation_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = create_model("resnet20", seed=3)
    b = create_model("resnet20", seed=3)
    c = create_model("resnet20", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_device_and_dtype_are_passed_in():
    model = create_model("mlp", dtype=torch.float64, device="cpu")
    assert next(model.parameters()).dtype == torch.float64
    assert model(torch.randn(2, 1, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_mlp_checks_features_against_channels():
    assert create_model("mlp", in_channels=3, in_features=3 * 32 * 32)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ArchitectureError, match="multiple of in_channels"):
        create_model("mlp", in_channels=3, in_features=64)


def test_torchvision_adapter_single_channel():
    model = create_model("tv_resnet18", in_channels=1, num_classes=4).eval()
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 4)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_torchvision_adapter_loads_local_weights(tmp_path, suffix):
    source = create_model("tv_resnet18", seed=1)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".pt":
        torch.save({"state_dict": state}, path)  # nested, as training scripts often write it
    else:
        save_file(state, path)
    model = create_model("tv_resnet18", weights_path=str(path))
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    assert "weights_path" not in model_config(model)["kwargs"]


def test_torchvision_adapter_rejects_mismatched_weights(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("tv_resnet18", num_classes=1000).state_dict().items()}, path)
    with pytest.raises(CheckpointError, match=r"'fc.weight' has shape \(1000, 512\).*\(10, 512\)"):
        create_model("tv_resnet18", weights_path=str(path))


def test_load_state_dict_file_refuses_pickled_objects(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(create_model("mlp"), path)  # a whole module: not loadable with weights_only=True
    with pytest.raises(CheckpointError, match="weights_only=True") as exc:
        load_state_dict_file(path)
    assert "\n" not in str(exc.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_file(tmp_path / "nope.pt")
