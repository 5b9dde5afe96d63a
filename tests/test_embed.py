"""Image embedders: the registry, CLIP through open_clip (a tiny randomly initialised model saved and loaded
from a file, so the real loading and embedding code runs offline), one-line errors when CLIP weights can't be
had, the penultimate-features fallback, and the cache that embeds each image id once."""
import json

import numpy as np
import pytest
import torch

from mergescope.compare import clip_delta_from_ids
from mergescope.data import load_digits
from mergescope.embed import (
    EMBEDDER_KINDS,
    ClipEmbedder,
    EmbeddingCache,
    FallbackEmbedder,
    ImageEmbedder,
    create_embedder,
    list_embedders,
    register_embedder,
)
from mergescope.errors import MergescopeError
from mergescope.models import create_model

TINY_CLIP = {  # a 2-layer ViT with 16-d embeddings: milliseconds on a CPU
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
}


@pytest.fixture(scope="module")
def digits():
    return load_digits("train")


def test_registry():
    assert {"clip", "fallback"} <= set(list_embedders())
    with pytest.raises(MergescopeError, match="unknown embedder 'nope'"):
        create_embedder("nope")
    with pytest.raises(MergescopeError, match="fallback"):
        create_embedder("fallback", model=create_model("mlp"), not_an_argument=1)
    with pytest.raises(MergescopeError, match="registered twice"):
        register_embedder("clip")(ClipEmbedder)


def test_clip_errors_are_one_line_and_name_the_fallback(tmp_path):
    pytest.importorskip("open_clip")
    cases = [
        dict(model_name="ViT-B-32", pretrained="openai", cache_dir=str(tmp_path)),  # not cached, download=False
        dict(model_name="ViT-B-32", pretrained=str(tmp_path / "missing.bin")),
        dict(model_name="ViT-B-32", pretrained="no-such-tag"),
        dict(model_name="No-Such-Model", pretrained="openai"),
    ]
    for kw in cases:
        with pytest.raises(MergescopeError) as err:
            create_embedder("clip", **kw)
        message = str(err.value)
        assert "\n" not in message and "create_embedder('fallback'" in message and "not CLIP" in message, kw
    with pytest.raises(MergescopeError, match="could not be loaded"):
        garbage = tmp_path / "garbage.bin"
        garbage.write_bytes(b"not a checkpoint")
        create_embedder("clip", model_name="ViT-B-32", pretrained=str(garbage))


def test_clip_embeds_with_a_tiny_local_open_clip_model(tmp_path, digits):
    open_clip = pytest.importorskip("open_clip")
    config = tmp_path / "mergescope-tiny-test.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(config))  # registers "mergescope-tiny-test"
    torch.manual_seed(0)
    model = open_clip.create_model("mergescope-tiny-test")  # random weights
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)

    embedder = create_embedder("clip", model_name="mergescope-tiny-test", pretrained=str(weights))
    assert isinstance(embedder, ImageEmbedder) and embedder.kind == "clip" in EMBEDDER_KINDS
    assert "mergescope-tiny-test" in embedder.name
    images = [digits.image(i) for i in (0, 1, 2, 0)]  # 8x8 grayscale: resized and converted to RGB
    emb = embedder.embed(images)
    assert emb.shape == (4, 16) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    assert torch.equal(emb[0], emb[3]) and not torch.allclose(emb[0], emb[1])
    # the same weights wrapped directly give the same embeddings: the file was really loaded
    wrapped = ClipEmbedder.from_model(model, open_clip.image_transform(32, is_train=False), name="tiny")
    torch.testing.assert_close(wrapped.embed(images), emb)
    # and they equal encode_image by hand
    pre = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        by_hand = model.encode_image(torch.stack([pre(im.convert("RGB")) for im in images]))
    torch.testing.assert_close(emb, by_hand / by_hand.norm(dim=1, keepdim=True))


def test_fallback_uses_penultimate_features_and_leaves_no_hook(digits):
    model = create_model("cnn_digits", width=8, seed=0)
    model.train()
    embedder = create_embedder("fallback", model=model, mean=digits.mean, std=digits.std)
    assert embedder.kind == "fallback" and embedder.name == "fallback (penultimate features of cnn_digits), not CLIP"
    emb = embedder.embed([digits.image(i) for i in range(5)])
    assert emb.shape == (5, 4 * 8 * 2 * 2)
    model.eval()
    with torch.no_grad():
        feats = model.features(digits.get_batch(torch.arange(5))[0]).flatten(1)  # input of the classifier
    torch.testing.assert_close(emb, feats / feats.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
    model.train()
    embedder.embed([digits.image(0)])
    assert model.training  # flag restored
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())  # hook removed
    with pytest.raises(MergescopeError, match="no nn.Linear"):
        FallbackEmbedder(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))
    with pytest.raises(MergescopeError, match="no module"):
        FallbackEmbedder(model, layer="nope")


class CountingEmbedder:
    """A toy embedder ([mean pixel, 1], normalised) that records which images it was asked for."""

    name, kind = "counting (toy), not CLIP", "fallback"

    def __init__(self):
        self.calls = []

    def embed(self, images):
        self.calls.append(len(images))
        means = torch.tensor([float(np.asarray(im, dtype=np.float32).mean()) for im in images])
        v = torch.stack([means, torch.ones_like(means)], 1)
        return v / v.norm(dim=1, keepdim=True)


def test_cache_embeds_each_distinct_id_once(digits):
    toy = CountingEmbedder()
    cache = EmbeddingCache(toy, batch_size=3)
    first = cache.get([5, 7, 5, 9, 7, 11], digits)
    assert first.shape == (6, 2) and cache.computed == 4 and toy.calls == [3, 1]
    assert torch.equal(first[0], first[2]) and torch.equal(first[1], first[4])
    second = cache.get(torch.tensor([9, 11, 12]), digits)
    assert cache.computed == 5 and cache.requested == 9 and len(cache) == 5
    assert torch.equal(second[0], first[3])
    with pytest.raises(MergescopeError, match="one cache per dataset"):
        cache.get([0], load_digits("test"))
    # CLIP-δ over a layer: every image shared between top-k sets is embedded once
    toy2 = CountingEmbedder()
    cache2 = EmbeddingCache(toy2)
    ids_a = torch.tensor([[1, 2, 3], [3, 4, 5], [5, 6, 1]])
    ids_b = torch.tensor([[1, 2, 7], [3, 4, 5], [8, 6, -1]])
    clip_delta_from_ids(ids_a, ids_b, lambda ids: cache2.get(ids, digits))
    assert cache2.computed == 8 and sum(toy2.calls) == 8
