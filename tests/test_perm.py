"""Permutation spec and its application: permuted copies compute the same function; known spec structure."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mergescope.errors import ArchitectureError
from mergescope.models import create_model, list_models
from mergescope.perm import apply_permutation, build_spec, invert, list_layers, permute_model, random_perms

ALL_MODELS = list_models()
BN_PARAMS = ("running_mean", "running_var")


def _rel_err(ya: torch.Tensor, yb: torch.Tensor) -> float:
    return ((ya - yb).abs().max() / ya.abs().max()).item()


def _without_axes(spec, drop):
    """A stand-in spec for ``apply_permutation`` that skips the axes for which ``drop(group, axis)`` is true."""
    return types.SimpleNamespace(groups={
        g: types.SimpleNamespace(axes=[ax for ax in grp.axes if not drop(g, ax)]) for g, grp in spec.groups.items()
    })


@pytest.mark.parametrize("name", ALL_MODELS)
def test_random_permutation_preserves_the_function(name, zoo, helpers):
    model = zoo(name)
    x = helpers.random_images(name, 4, seed=1)
    spec = build_spec(model, x[:2])
    perms = random_perms(spec, torch.Generator().manual_seed(0))
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perms.values() if len(p) > 2)
    permuted = permute_model(model, spec, perms).eval()
    changed = {k for k, v in permuted.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert changed <= set(spec.param_axes)  # nothing outside the spec moved...
    assert {k for k in spec.param_axes if k.endswith("weight")} <= changed  # ...and every weight did
    with torch.no_grad():
        y, y_perm = model(x), permuted(x)
        assert y.abs().max() > 0
        assert _rel_err(y, y_perm) < 1e-5

        # Control: the check is sensitive. Leaving out some axes must change the output — the BatchNorm
        # running statistics for BN models (so BN axes are really exercised), else one group's input axes.
        has_bn = any(ax.param.endswith(BN_PARAMS) for g in spec.groups.values() for ax in g.axes)
        if has_bn:
            drop = lambda g, ax: ax.param.endswith(BN_PARAMS)  # noqa: E731
        else:
            first = next(iter(spec.groups))
            drop = lambda g, ax: g == first and ax.axis == 1  # noqa: E731
        broken = apply_permutation(model.state_dict(), _without_axes(spec, drop), perms)
        assert _rel_err(y, functional_call(model, broken, (x,))) > 1e-3


@pytest.mark.parametrize("name", ALL_MODELS)
def test_spec_axes_fit_the_weights_and_fixed_is_the_classifier(name, zoo, helpers):
    model = zoo(name)
    spec = build_spec(model, helpers.random_images(name, 2))
    state = model.state_dict()
    last_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert spec.fixed == [last_linear]
    assert all(not ax.param.startswith(last_linear + ".") or ax.axis == 1
               for g in spec.groups.values() for ax in g.axes)  # logits never move
    seen = set()
    for g in spec.groups.values():
        assert g.observe and all(t.group == g.name and t.channels == g.size for t in g.observe)
        for ax in g.axes:
            assert state[ax.param].shape[ax.axis] == g.size * ax.block
            assert spec.param_axes[ax.param][ax.axis] == g.name
            assert (ax.param, ax.axis) not in seen  # an axis belongs to one group only
            seen.add((ax.param, ax.axis))
    assert all(t.group in spec.groups for t in (p.tap for p in spec.repair_points))


def _axis(spec, param, axis):
    return next((g, ax) for g, grp in spec.groups.items() for ax in grp.axes if (ax.param, ax.axis) == (param, axis))


def test_resnet20_residual_streams_are_single_groups():
    spec = build_spec(create_model("resnet20", width=0.5))
    assert len(spec.groups) == 12  # 3 residual streams + one internal group per block (9)
    assert spec.fixed == ["fc"]
    stem, _ = _axis(spec, "conv1.weight", 0)
    for i in range(3):
        assert spec.param_axes[f"layer1.{i}.conv2.weight"][0] == stem
        assert spec.param_axes[f"layer1.{i}.bn2.running_mean"] == (stem,)
        assert spec.param_axes[f"layer1.{i}.conv1.weight"][1] == stem
        internal = spec.param_axes[f"layer1.{i}.conv1.weight"][0]
        assert internal not in (None, stem) and spec.param_axes[f"layer1.{i}.conv2.weight"][1] == internal
    assert spec.param_axes["bn1.weight"] == (stem,)
    # the 1x1 shortcut reads the previous stream and writes the next stage's stream
    stream2 = spec.param_axes["layer2.0.conv2.weight"][0]
    assert spec.param_axes["layer2.0.shortcut.0.weight"][:2] == (stream2, stem)
    assert spec.param_axes["layer2.0.shortcut.1.running_var"] == (stream2,)
    assert {spec.param_axes[f"layer2.{i}.conv2.weight"][0] for i in range(3)} == {stream2}
    stream3 = spec.param_axes["layer3.0.shortcut.0.weight"][0]
    assert stream3 not in (stem, stream2)
    assert spec.param_axes["fc.weight"] == (None, stream3)
    assert "fc.bias" not in spec.param_axes
    assert [t.name for t in spec.groups[stem].observe] == ["relu", "layer1.0", "layer1.1", "layer1.2"]


def test_resnet20_list_layers_names_block_outputs():
    layers = list_layers(create_model("resnet20", width=0.5))
    for stage in (1, 2, 3):
        for block in range(3):
            assert f"layer{stage}.{block}" in layers
            assert layers.index(f"layer{stage}.{block}.relu") < layers.index(f"layer{stage}.{block}")
    assert len(layers) == len(set(layers)) == 1 + 9 * 2


def _flattened_hw(name: str, model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        fmap = model.features(x)
        if hasattr(model, "avgpool"):
            fmap = model.avgpool(fmap)
    return fmap.shape[2] * fmap.shape[3]


@pytest.mark.parametrize("name, linear, last_conv, block", [
    ("cnn_digits", "classifier", "features.7", 4),  # 2x2 map
    ("alexnet_cifar", "classifier.1", "features.10", 16),  # 4x4 map
    ("vgg11", "classifier", "features.18", 1),  # 32 px / 2^5 = 1x1 map: no expansion
    ("tv_alexnet", "classifier.1", "features.10", 36),  # adaptive pool to 6x6
    ("tv_vgg11", "classifier.0", "features.18", 49),  # adaptive pool to 7x7
])
def test_flatten_into_linear_expands_each_channel_into_a_block(name, linear, last_conv, block, zoo, helpers):
    model = zoo(name)
    x = helpers.random_images(name, 2)
    assert _flattened_hw(name, model, x) == block
    spec = build_spec(model, x)
    group, ax = _axis(spec, f"{linear}.weight", 1)
    assert group == spec.param_axes[f"{last_conv}.weight"][0]
    assert ax.block == block
    assert spec.groups[group].size * block == model.get_submodule(linear).in_features


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(-x)


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(F.relu(torch.cat([self.a(x), self.b(x)], dim=1)))


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.conv2(F.relu(self.conv1(x)))))


def test_untraceable_model_is_a_one_line_architecture_error():
    with pytest.raises(ArchitectureError) as exc:
        build_spec(_Untraceable(), torch.zeros(2, 3, 8, 8))
    msg = str(exc.value)
    assert "\n" not in msg and "_Untraceable" in msg and "traced" in msg


@pytest.mark.parametrize("model, node, why", [
    (_Concat(), "'cat'", "not supported"),
    (_Grouped(), "'conv2'", "groups=2"),
])
def test_unsupported_op_names_the_node(model, node, why):
    with pytest.raises(ArchitectureError) as exc:
        build_spec(model, torch.zeros(2, 3, 8, 8))
    msg = str(exc.value)
    assert "\n" not in msg and node in msg and why in msg


def test_invert_and_apply_roundtrip(zoo):
    model = zoo("cnn_digits")
    spec = build_spec(model)
    perms = random_perms(spec, torch.Generator().manual_seed(3))
    state = apply_permutation(model.state_dict(), spec, perms)
    back = apply_permutation(state, spec, {g: invert(p) for g, p in perms.items()})
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    for g, p in perms.items():
        assert torch.equal(p[invert(p)], torch.arange(len(p)))
