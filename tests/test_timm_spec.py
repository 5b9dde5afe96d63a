"""timm CNNs: the spec is derived from timm's own modules (deep stem, avg-pool downsample, Basic and Bottleneck
blocks, ``SelectAdaptivePool2d`` with its flatten, the classifier head), a random permutation preserves the
function exactly, and activation matching of a permuted copy gives back the inverse permutation."""
from __future__ import annotations

import types

import pytest
import torch
from torch.func import functional_call

from mergescope.align import match_many
from mergescope.errors import ArchitectureError
from mergescope.perm import apply_permutation, build_spec, invert, permute_model, random_perms, select_layers

timm = pytest.importorskip("timm")

# test_resnet: a real, tiny residual net (deep stem, avg_down, blocks Basic/Basic/Bottleneck/Basic);
# resnet18: timm's standard ResNet-18 (1x1-conv downsample). Also timm's activations from create_act (its
# in-place Tanh is a method call, tanh_) and the other global pools of SelectAdaptivePool2d ("fast": a mean).
ARCHS = [("test_resnet", {}), ("resnet18", {}), ("test_resnet", {"act_layer": "tanh", "global_pool": "max"}),
         ("test_resnet", {"act_layer": "silu", "global_pool": "fast"})]
ARCH_IDS = [f"{name}-{'-'.join(map(str, kw.values()))}" if kw else name for name, kw in ARCHS]
SIZE = (3, 32, 32)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def timm_model(helpers):
    """``timm_model(name, **kw)``: a shared eval-mode timm model, random init, with random BatchNorm affine parameters
    (timm zero-inits each block's last BN) and running statistics estimated on the test images — as in a trained
    net, every channel is live (with raw random-init statistics dozens of deep channels never fire, and dead
    channels cannot be matched)."""
    cache = {}

    def get(name: str, **kw) -> torch.nn.Module:
        key = (name, *sorted(kw.items()))
        if key not in cache:
            torch.manual_seed(0)
            model = helpers.randomize_batchnorm(timm.create_model(name, pretrained=False, num_classes=10, **kw))
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average over the calibration batch
            with torch.no_grad():
                model.train()(_images(256, seed=2))
            cache[key] = model.eval()
        return cache[key]
    return get


@pytest.mark.parametrize("name, kw", ARCHS, ids=ARCH_IDS)
def test_timm_resnet_traces_into_the_expected_groups(name, kw, timm_model):
    model = timm_model(name, **kw)
    spec = build_spec(model, _images(2))
    assert spec.fixed == ["fc"]  # the classifier behind SelectAdaptivePool2d + flatten
    last_stream = spec.param_axes["fc.weight"][1]
    assert last_stream is not None and spec.groups[last_stream].size == model.fc.in_features
    blocks = [f"layer{s}.{b}" for s, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), 1)
              for b in range(len(stage))]
    assert set(blocks) <= {t.name for t in spec.block_outputs}
    assert select_layers(spec) == list(spec.layers)  # every observable layer is a feature map
    params = dict(model.named_parameters())
    moved = {ax.param for g in spec.groups.values() for ax in g.axes}
    assert {k for k in params if k != "fc.bias"} <= moved  # every weight but the logits' bias moves


@pytest.mark.parametrize("name, kw", ARCHS, ids=ARCH_IDS)
def test_a_random_permutation_of_a_timm_resnet_computes_the_same_function(name, kw, timm_model):
    model = timm_model(name, **kw)
    x = _images(4, seed=1)
    spec = build_spec(model, x[:2])
    perms = random_perms(spec, torch.Generator().manual_seed(0))
    permuted = permute_model(model, spec, perms).eval()
    with torch.no_grad():
        y, y_perm = model(x), permuted(x)
    assert y.abs().max() > 0
    assert ((y - y_perm).abs().max() / y.abs().max()).item() < 1e-5
    # Control: the check is sensitive — moving the last stream's channels but not the classifier's inputs
    # breaks the function.
    last = spec.param_axes["fc.weight"][1]
    outputs_only = types.SimpleNamespace(groups={last: types.SimpleNamespace(
        axes=[ax for ax in spec.groups[last].axes if ax.param != "fc.weight"])})
    broken = apply_permutation(model.state_dict(), outputs_only, {last: perms[last]})
    with torch.no_grad():
        assert ((y - functional_call(model, broken, (x,))).abs().max() / y.abs().max()).item() > 1e-3


def test_activation_matching_maps_a_permuted_timm_resnet_back_onto_itself(timm_model):
    model = timm_model("test_resnet")
    spec = build_spec(model, _images(2))
    q = random_perms(spec, torch.Generator().manual_seed(3))
    copy = permute_model(model, spec, q).eval()
    batches = [types.SimpleNamespace(x=x) for x in _images(256, seed=2).split(64)]
    [result] = match_many(model, [copy], spec, batches)
    wrong = {g: int((result.perms[g] != invert(q[g])).sum()) for g in spec.groups}
    assert not any(wrong.values()), f"channels matched wrongly per group: {wrong}"
    back = permute_model(copy, spec, result.perms).state_dict()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_a_split_feature_map_is_refused_not_skipped(timm_model):
    """Selective-kernel blocks split a feature map into a tuple: the tracer must stop there, not silently leave
    the convs behind it out of the spec (which gave permutations that changed the function)."""
    model = timm.create_model("skresnet18", pretrained=False, num_classes=10).eval()
    with pytest.raises(ArchitectureError, match=r"layer1\.0\.conv1\.split.*not one tensor"):
        build_spec(model, _images(2))
