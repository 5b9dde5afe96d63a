"""Checkpoints in, whatever their form: raw state-dict files, wrapper prefixes, tv_*/timm: architectures, shapes
read off the tensors, sidecars that must agree with --arch, and one-line errors naming the keys that don't fit."""

from __future__ import annotations

import hashlib
import os
import shlex
import sys

import pytest
import torch
from safetensors.torch import save_file

from mergescope.errors import ArchitectureError, CheckpointError
from mergescope.models import create_model, infer_shape_kwargs, list_models, model_config, timm_models
from mergescope.train import checkpoint_sha256, load_checkpoint, save_checkpoint, sidecar_path

timm = pytest.importorskip("timm")
TIMM_SMALL = "test_resnet"  # timm's own tiny test ResNet (~0.4M parameters)
NUM_CLASSES = 7  # not any builder's default, so loading must read it off the classifier


def one_line(exc_info, *fragments: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def contiguous(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_state(state: dict[str, torch.Tensor], path, form: str) -> None:
    """Write ``state`` as a user's training script might have."""
    if form == "module":  # DistributedDataParallel / DataParallel
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif form == "nested":
        torch.save({"epoch": 3, "state_dict": state, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    elif form == "compiled-ddp":  # DDP around torch.compile
        torch.save({f"module._orig_mod.{k}": v for k, v in state.items()}, path)
    elif str(path).endswith((".safetensors", ".st")):
        save_file(state, str(path))
    else:
        torch.save(state, path)


def assert_same_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert list(got) == list(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


@pytest.fixture(scope="module")
def tv_sources():
    """Randomly initialised torchvision classifiers with a non-default number of classes."""
    return {name: create_model(name, num_classes=NUM_CLASSES, seed=3).eval() for name in ("tv_alexnet", "tv_resnet18")}


@pytest.mark.parametrize("arch", ["tv_alexnet", "tv_resnet18"])
@pytest.mark.parametrize("form, suffix", [("plain", ".pth"), ("module", ".pth"), ("nested", ".pt"), ("plain", ".bin"),
                                          ("plain", ".safetensors"), ("plain", ".st")])
def test_raw_torchvision_state_dict_loads_with_arch(tmp_path, tv_sources, arch, form, suffix):
    state = contiguous(tv_sources[arch])
    path = tmp_path / f"a{suffix}"
    write_state(state, path, form)
    model, meta = load_checkpoint(path, arch=arch)
    assert meta == {}
    assert model_config(model) == {"name": arch, "kwargs": {"num_classes": NUM_CLASSES, "in_channels": 3}}
    assert_same_state(model, state)
    assert not model.training


def test_nested_wrappers_are_stripped(tmp_path):
    source = create_model("resnet20", num_classes=NUM_CLASSES, seed=1)
    write_state(contiguous(source), tmp_path / "a.pt", "compiled-ddp")
    model, _ = load_checkpoint(tmp_path / "a.pt", arch="resnet20")
    assert_same_state(model, contiguous(source))


def test_a_prefix_on_only_some_keys_is_kept(tmp_path):
    state = contiguous(create_model("resnet20", seed=1))
    state = {("module." + k if k.startswith("fc.") else k): v for k, v in state.items()}
    torch.save(state, tmp_path / "a.pt")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "a.pt", arch="resnet20")
    one_line(exc, "missing tensor 'fc.weight', 'fc.bias'", "unexpected tensor 'module.fc.weight', 'module.fc.bias'")


def test_input_channels_are_read_off_the_stem(tmp_path):
    source = create_model("tv_resnet18", num_classes=4, in_channels=1, seed=2)
    save_file(contiguous(source), tmp_path / "gray.safetensors")
    model, _ = load_checkpoint(tmp_path / "gray.safetensors", arch="tv_resnet18")
    assert model_config(model)["kwargs"] == {"num_classes": 4, "in_channels": 1}
    assert model.input_size == (1, 224, 224)
    assert_same_state(model, contiguous(source))


def test_an_explicit_shape_argument_wins(tmp_path):
    save_file(contiguous(create_model("resnet20", num_classes=NUM_CLASSES, seed=0)), tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "a.safetensors", arch="resnet20", arch_kwargs={"num_classes": 5})
    one_line(exc, "tensor 'fc.weight' has shape (7, 64) in the checkpoint but (5, 64) in the model")


@pytest.mark.parametrize("name", [*list_models(), f"timm:{TIMM_SMALL}"])
def test_shape_arguments_are_inferred_for_every_architecture(name):
    """Built on the meta device (shapes only), so even the 100M-parameter torchvision models cost nothing."""
    with torch.device("meta"):
        defaults = create_model(name)
        kwargs = model_config(defaults)["kwargs"]
        channels = "in_chans" if name.startswith("timm:") else "in_channels"
        has_stem = any(v.ndim == 4 for v in defaults.state_dict().values())
        changed = {"num_classes": NUM_CLASSES, **({channels: 1} if has_stem else {})}  # an MLP has no stem
        source = create_model(name, **changed)
    assert kwargs["num_classes"] != NUM_CLASSES
    assert infer_shape_kwargs(defaults, source.state_dict()) == changed


# --- mergescope checkpoints with an explicit --arch ------------------------------------------------------------


@pytest.fixture
def saved_resnet(tmp_path):
    path = tmp_path / "a.safetensors"
    save_checkpoint(path, create_model("resnet20", width=2, seed=0), meta={"seed": 0})
    return path


def test_agreeing_arch_loads(saved_resnet):
    model, meta = load_checkpoint(saved_resnet, arch="resnet20", arch_kwargs={"width": 2, "num_classes": 10})
    assert meta == {"seed": 0} and model_config(model)["kwargs"]["width"] == 2


def test_disagreeing_arch_says_how(saved_resnet):
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(saved_resnet, arch="tv_resnet18")
    one_line(exc, f"--arch tv_resnet18 disagrees with the sidecar {sidecar_path(saved_resnet)}, which records resnet20")


@pytest.mark.parametrize("arch", [None, "resnet20"])
def test_disagreeing_arch_kwargs_say_how(saved_resnet, arch):
    side = sidecar_path(saved_resnet)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(saved_resnet, arch=arch, arch_kwargs={"width": 4})
    one_line(exc, f"--arch-kwargs width=4 but {side} records width=2")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(saved_resnet, arch=arch, arch_kwargs={"depth": 3})
    one_line(exc, f"--arch-kwargs depth=3 but {side} records no depth", "num_classes, in_channels, width")


def test_without_a_sidecar_the_error_names_the_cli_options(tmp_path):
    torch.save(contiguous(create_model("resnet20", seed=0)), tmp_path / "a.pth")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "a.pth", arch_kwargs={"width": 1})
    one_line(exc, "a.json is missing", "pass --arch NAME [--arch-kwargs JSON]", "timm:NAME")


# --- timm -----------------------------------------------------------------------------------------------------


def test_timm_model_records_its_architecture_and_input_size():
    model = create_model("timm:resnet18", num_classes=10)
    assert model_config(model) == {"name": "timm:resnet18", "kwargs": {"num_classes": 10, "in_chans": 3}}
    assert model.input_size == (3, 224, 224)
    assert model.get_classifier().out_features == 10
    small = create_model(f"timm:{TIMM_SMALL}", in_chans=1)
    assert small.input_size == (1, *timm.models.get_pretrained_cfg(TIMM_SMALL).input_size[1:])
    assert model_config(small)["kwargs"]["num_classes"] == 1000  # timm's default for an ImageNet config


def test_timm_checkpoint_round_trip(tmp_path):
    model = create_model(f"timm:{TIMM_SMALL}", num_classes=10, seed=0).eval()
    with torch.no_grad():
        for m in model.modules():  # non-trivial BatchNorm statistics, so a lost buffer would show
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    save_checkpoint(tmp_path / "t.safetensors", model)
    loaded, _ = load_checkpoint(tmp_path / "t.safetensors")
    x = torch.randn(2, *model.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert model_config(loaded) == model_config(model)


def test_raw_timm_state_dict_loads_with_arch(tmp_path):
    source = create_model(f"timm:{TIMM_SMALL}", num_classes=NUM_CLASSES, seed=1)
    torch.save({"model": {f"module.{k}": v for k, v in contiguous(source).items()}}, tmp_path / "t.pth")
    rng = torch.random.get_rng_state()
    model, _ = load_checkpoint(tmp_path / "t.pth", arch=f"timm:{TIMM_SMALL}")
    assert torch.equal(torch.random.get_rng_state(), rng)  # loading leaves the global RNG alone
    assert model_config(model)["kwargs"] == {"num_classes": NUM_CLASSES, "in_chans": 3}
    assert_same_state(model, contiguous(source))


def test_unknown_timm_name_says_where_names_are():
    with pytest.raises(ArchitectureError) as exc:
        create_model("timm:no_such_net")
    one_line(exc, "unknown timm model 'no_such_net'", "timm.list_models")


def test_missing_timm_says_how_to_install(monkeypatch):
    timm_models.timm_entry.cache_clear()
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    try:
        with pytest.raises(ArchitectureError) as exc:
            create_model(f"timm:{TIMM_SMALL}")
        one_line(exc, "pip install timm")
    finally:
        timm_models.timm_entry.cache_clear()


def test_unknown_name_mentions_the_timm_namespace():
    with pytest.raises(ArchitectureError) as exc:
        create_model("resnet_18")
    one_line(exc, "unknown model 'resnet_18'", "tv_resnet18", "timm:NAME")


# --- what doesn't fit, and what must not run -------------------------------------------------------------------


@pytest.fixture
def resnet_state():
    return contiguous(create_model("resnet20", seed=0))


def test_missing_keys_are_named_with_a_count(tmp_path, resnet_state):
    dropped = [k for k in resnet_state if k.endswith(".bias")][:5]
    save_file({k: v for k, v in resnet_state.items() if k not in dropped}, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "a.safetensors", arch="resnet20")
    shown = ", ".join(f"'{k}'" for k in dropped[:3])
    one_line(exc, "does not fit architecture 'resnet20' (5 missing, 0 unexpected, 0 mis-shaped)",
             f"missing tensor {shown} (+2 more)")


def test_an_extra_key_is_named(tmp_path, resnet_state):
    save_file({**resnet_state, "head.extra.weight": torch.zeros(3)}, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "a.safetensors", arch="resnet20")
    message = one_line(exc, "(0 missing, 1 unexpected, 0 mis-shaped)", "unexpected tensor 'head.extra.weight'")
    assert "more" not in message


def test_wrong_shapes_are_named_with_both_shapes(tmp_path, resnet_state):
    bad = [k for k, v in resnet_state.items() if v.ndim == 4][2:7]  # past the stem, whose shape sets in_channels
    state = {k: (torch.zeros(*v.shape[:-1], v.shape[-1] + 2) if k in bad else v) for k, v in resnet_state.items()}
    save_file(state, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "a.safetensors", arch="resnet20")
    want = tuple(resnet_state[bad[0]].shape)
    got = (*want[:-1], want[-1] + 2)
    message = one_line(exc, "(0 missing, 0 unexpected, 5 mis-shaped)",
                       f"tensor '{bad[0]}' has shape {got} in the checkpoint but {want} in the model",
                       f"tensor '{bad[2]}' has shape", "+2 more mis-shaped")
    assert f"'{bad[3]}'" not in message


class _Exploit:
    """Unpickling this object would run a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_a_pickle_exploit_is_refused_and_never_runs(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": _Exploit(f"touch {shlex.quote(str(marker))}")}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, arch="resnet20")
    one_line(exc, f"cannot load {path} with torch.load(weights_only=True)")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file is a real exploit: a plain torch.load runs it
    assert marker.exists()


def test_checkpoint_sha256_hashes_the_weights_file(saved_resnet):
    assert checkpoint_sha256(saved_resnet) == hashlib.sha256(saved_resnet.read_bytes()).hexdigest()
    before = checkpoint_sha256(saved_resnet)
    sidecar_path(saved_resnet).write_text(sidecar_path(saved_resnet).read_text() + " ")
    assert checkpoint_sha256(saved_resnet) == before  # the sidecar is not part of it
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint_sha256(saved_resnet.with_name("absent.safetensors"))
