"""The probe's layers: the conv channels and residual block outputs by default (000 §3.1.3, App. C), linear
layers on request ("all" or by name)."""
from __future__ import annotations

import pytest
import torch

from mergescope.data import InMemoryDataset
from mergescope.errors import MergescopeError
from mergescope.models import create_model
from mergescope.perm import LAYER_SELECTIONS, build_spec, select_layers
from mergescope.probe import probe

ALEXNET_CONV = ["features.1", "features.4", "features.7", "features.9", "features.11"]  # the five conv ReLUs
ALEXNET_LINEAR = ["classifier.2", "classifier.5"]  # the ReLUs of the two 4,096-unit linear layers


@pytest.fixture(scope="module")
def alexnet():
    return create_model("tv_alexnet", num_classes=10, seed=0).eval()


@pytest.fixture(scope="module")
def alexnet_spec(alexnet):
    return build_spec(alexnet, torch.zeros(2, 3, 64, 64))


def test_alexnet_conv_selection_leaves_out_the_linear_layers(alexnet_spec):
    assert list(alexnet_spec.layers) == ALEXNET_CONV + ALEXNET_LINEAR
    assert select_layers(alexnet_spec) == ALEXNET_CONV
    assert select_layers(alexnet_spec, "conv") == ALEXNET_CONV
    assert select_layers(alexnet_spec, "all") == ALEXNET_CONV + ALEXNET_LINEAR
    assert [alexnet_spec.layers[n].spatial for n in alexnet_spec.layers] == [True] * 5 + [False] * 2


def test_digits_cnn_has_only_conv_layers():
    spec = build_spec(create_model("cnn_digits", width=8))
    assert len(spec.layers) == 3
    assert select_layers(spec) == list(spec.layers) == select_layers(spec, "all")


def test_resnet_conv_selection_includes_the_block_outputs():
    spec = build_spec(create_model("resnet20", width=1))
    conv = select_layers(spec)
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert all(b in conv for b in blocks) and {t.name for t in spec.block_outputs} <= set(conv)
    assert conv == list(spec.layers)  # the classifier is the only linear layer, and its logits are no layer


def test_an_mlp_falls_back_to_all_its_layers():
    spec = build_spec(create_model("mlp"))
    assert spec.layers and not any(t.spatial for t in spec.layers.values())
    assert select_layers(spec) == list(spec.layers)


def test_layers_by_name_keep_the_given_order(alexnet_spec):
    assert select_layers(alexnet_spec, ["classifier.2", "features.1", "classifier.2"]) == ["classifier.2", "features.1"]
    assert select_layers(alexnet_spec, "classifier.5") == ["classifier.5"]
    assert select_layers(alexnet_spec, ("features.4",)) == ["features.4"]


@pytest.mark.parametrize("layers", [["features.1", "fc7"], "conv2d", []])
def test_unknown_or_no_layer_names_give_one_line_listing_the_valid_ones(alexnet_spec, layers):
    with pytest.raises(MergescopeError) as e:
        select_layers(alexnet_spec, layers)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("layers: ")
    assert all(n in msg for n in (*LAYER_SELECTIONS, *alexnet_spec.layers))
    assert ("'fc7'" in msg or "'conv2d'" in msg) if layers else "no layer" in msg


def test_probe_looks_at_the_conv_layers_by_default(alexnet):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 64, 64, 3), generator=g, dtype=torch.uint8)
    ds = InMemoryDataset(images, [0, 1, 2, 0, 1, 2], ["a", "b", "c"], (0.5,) * 3, (0.25,) * 3)
    default = probe({"A": alexnet}, ds, k=2, batch_size=6, progress=False)
    assert default.layers["A"] == ALEXNET_CONV
    everything = probe({"A": alexnet}, ds, layers="all", k=2, batch_size=6, progress=False)
    assert everything.layers["A"] == ALEXNET_CONV + ALEXNET_LINEAR
    assert everything["A", "classifier.2"].topk_ids.shape == (4096, 2)
    assert torch.equal(everything["A", "features.4"].topk_ids, default["A", "features.4"].topk_ids)
    named = probe({"A": alexnet}, ds, layers={"A": "classifier.5"}, k=2, batch_size=6, progress=False)
    assert named.layers["A"] == ["classifier.5"]
