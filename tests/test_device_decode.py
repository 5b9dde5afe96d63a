"""Decoding a lazy ImageFolder tree's JPEGs where the models run (``--decode device``; on this CPU-only machine the
device is the CPU, the code path the same as on CUDA up to the device argument)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mergescope.data.folder as folder
from mergescope.data import ImageFolderDataset, decode_device, iter_batches, set_decode_device
from mergescope.errors import DatasetError


def _tree(root, sizes, png=()):
    """JPEGs (quality 90) of smooth random colour fields plus noise in two class folders; ``png``: indices saved
    as PNG instead."""
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        field = rng.random((h // 20 + 1, w // 20 + 1, 3))
        img = Image.fromarray((field * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        arr = (np.asarray(img).astype(np.int16) + rng.integers(-10, 11, (h, w, 3))).clip(0, 255).astype(np.uint8)
        sub = root / ("a" if i < len(sizes) // 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(sub / f"{i:02d}.{'png' if i in png else 'jpg'}", quality=90)
    return root


@pytest.fixture
def on_device():
    set_decode_device("cpu")
    yield
    set_decode_device(None)


@pytest.fixture
def decode_calls(monkeypatch):
    calls = []
    real = folder.decode_batch
    monkeypatch.setattr(folder, "decode_batch", lambda blobs, *a, **k: (calls.append(len(blobs)), real(blobs, *a, **k))[1])
    return calls


@pytest.mark.parametrize("workers", [0, 1])
def test_imagenet_tree_decoded_on_the_device_equals_the_workers_pillow_batches(tmp_path, decode_calls, workers):
    """Resize 256 + centre crop 224 of JPEGs of both orientations and one PNG (decoded by Pillow even on the
    device path): every batch's ids and labels equal the default path's, and its pixels too, to within one level of
    256 on under 1% of them (torchvision's uint8 antialiased resize follows Pillow's; a 300×300 image rounds 0.1% of
    its pixels the other way) — the values as normalized, i.e. with the same arithmetic."""
    root = _tree(tmp_path / "t", [(300, 200), (200, 300), (257, 256), (180, 400), (300, 300), (256, 300)], png={2})
    ds = ImageFolderDataset(root, preset="imagenet", in_memory=False)
    want = list(iter_batches(ds, 4, num_workers=0))
    assert decode_calls == []
    set_decode_device("cpu")
    try:
        got = list(iter_batches(ds, 4, num_workers=workers))
    finally:
        set_decode_device(None)
    if workers == 0:
        assert decode_calls == [4, 2]  # the device path ran (with workers it runs in this process too)
    assert [b.x.shape for b in got] == [(4, 3, 224, 224), (2, 3, 224, 224)]
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    for a, b in zip(want, got):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.y, b.y)
        levels = ((a.x - b.x) * std * 255).abs()  # back in pixel levels
        assert float(levels.max()) < 1.001 and float((levels > 0.5).float().mean()) < 0.01
        same = torch.isclose(a.x, b.x, rtol=0, atol=1e-6).flatten(1).all(1)  # images off by nothing at all...
        assert torch.equal(a.x[same], b.x[same]) and int(same.sum()) >= len(same) - 1  # ...are bit-identical


def test_small_tree_on_the_device_keeps_the_size_rule_and_names_bad_files(tmp_path, on_device, decode_calls):
    """A lazily read tree of small images: decoded on the device, identical to Pillow's; an image of another size, or a
    file that starts like a JPEG but is not one, is a one-line DatasetError naming the file."""
    root = _tree(tmp_path / "t", [(32, 32)] * 6)
    ds = ImageFolderDataset(root, preset="small", in_memory=False)
    got = list(iter_batches(ds, 4, num_workers=0))
    set_decode_device(None)
    want = list(iter_batches(ds, 4, num_workers=0))
    assert decode_calls == [4, 2] and all(torch.equal(a.x, b.x) for a, b in zip(want, got))

    set_decode_device("cpu")
    odd = ds.paths[4]
    Image.new("RGB", (33, 32)).save(odd, format="JPEG")
    with pytest.raises(DatasetError, match=f"{odd} is 33x32, expected 32x32"):
        list(iter_batches(ds, 4, num_workers=0))
    broken = ds.paths[1]
    with open(broken, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + b"\x00" * 64)  # a JPEG's first bytes, then nothing decodable
    with pytest.raises(DatasetError, match=f"cannot decode image {broken}"):
        list(iter_batches(ds, 4, num_workers=0))


def test_cli_decode_option_sets_the_process_decoding_and_resets_it(tmp_path, monkeypatch):
    from mergescope.cli import main

    monkeypatch.setattr("mergescope.data.loader._decode_on", None)
    args = ["sweep", "nowhere_a.safetensors", "nowhere_b.safetensors", "--data", "digits", "--quiet", "--device", "cpu"]
    # applied before the command runs (which then fails on its missing checkpoints)
    main([*args, "--decode", "device", "--out", str(tmp_path / "a")])
    assert decode_device() == torch.device("cpu")
    main([*args, "--out", str(tmp_path / "b")])
    assert decode_device() is None
