"""Tests for mergescope.data: ids stay fixed, batches match items, splits are exact, every loader agrees."""

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mergescope.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ImageFolderDataset,
    InMemoryDataset,
    augment_batch,
    class_proportion_split,
    digits_split_ids,
    iter_batches,
    len_batches,
    load_cifar10,
    load_digits,
    load_jpeg_pack,
    open_dataset,
    stratified_pair,
    subset_per_class,
)
from mergescope.errors import DatasetError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
TEST_PACK = SHARED / "cifar10" / "cifar10_test.npz"


def _tiny_memory(seed=0, n=12, classes=3):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 5, 4, 3), generator=g, dtype=torch.uint8)  # [N,H,W,C]
    labels = torch.arange(n) % classes
    return InMemoryDataset(images, labels, [f"c{k}" for k in range(classes)], (0.2, 0.4, 0.6), (0.3, 0.2, 0.1))


# ---------------------------------------------------------------- digits


def test_digits_shapes_labels_and_split():
    train, test, full = load_digits("train"), load_digits("test"), load_digits("all")
    assert (len(train), len(test), len(full)) == (1437, 360, 1797)
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8) and isinstance(y, int)
    assert train.num_channels == 1 and train.image_size == (8, 8) and train.classes == [str(d) for d in range(10)]
    assert train.targets.dtype == np.int64 and set(np.unique(test.targets)) == set(range(10))
    assert full.images.max() == 255 and full.images.min() == 0

    tr, te = digits_split_ids("train"), digits_split_ids("test")
    assert np.intersect1d(tr, te).size == 0 and np.array_equal(np.union1d(tr, te), np.arange(1797))
    assert np.array_equal(tr, digits_split_ids("train"))  # deterministic
    # stratified: every class keeps (to rounding) 20 % of its images in test
    for c in range(10):
        n_c = (full.targets == c).sum()
        assert abs((test.targets == c).sum() - 0.2 * n_c) <= 1
    # ids index into the split: train image j is image tr[j] of the full set
    assert torch.equal(train.images, full.images[torch.from_numpy(tr)])
    assert np.array_equal(test.targets, full.targets[te])
    # normalization is shared by the splits, and roughly standardizes the data
    assert train.mean == test.mean and train.std == test.std
    xs, _ = full.get_batch(torch.arange(len(full)))
    assert abs(xs.mean().item()) < 1e-3 and abs(xs.std().item() - 1) < 1e-3


def test_digits_raw_image_and_bad_split():
    full = load_digits("all")
    img = full.image(5)
    assert img.mode == "L" and img.size == (8, 8)
    assert np.array_equal(np.asarray(img), full.images[5, :, :, 0].numpy())
    with pytest.raises(DatasetError, match="valid"):
        load_digits("valid")


# ---------------------------------------------------------------- in-memory datasets


def test_fingerprint_stable_and_content_sensitive():
    assert load_digits("train").fingerprint == load_digits("train").fingerprint
    assert load_digits("train").fingerprint != load_digits("test").fingerprint
    base = _tiny_memory()
    assert len(base.fingerprint) == 64 and int(base.fingerprint, 16) >= 0
    assert base.fingerprint == _tiny_memory().fingerprint

    pixel = base.images.clone()
    pixel[7, 2, 1, 0] ^= 1  # one bit of one pixel
    changed = InMemoryDataset(pixel, base.targets, base.classes, base.mean, base.std)
    assert changed.fingerprint != base.fingerprint

    labels = base.targets.copy()
    labels[0] = (labels[0] + 1) % 3
    relabelled = InMemoryDataset(base.images, labels, base.classes, base.mean, base.std)
    assert relabelled.fingerprint != base.fingerprint


def test_get_batch_equals_stacked_items_and_normalization():
    ds = _tiny_memory()
    ids = torch.tensor([3, 0, 11, 3, 7])
    x, y = ds.get_batch(ids)
    assert x.shape == (5, 3, 5, 4) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x, torch.stack([ds[int(i)][0] for i in ids]))
    assert y.tolist() == [ds[int(i)][1] for i in ids] and y.dtype == torch.int64
    # value check against the definition (pixel/255 - mean) / std, channels first
    want = (ds.images[3].permute(2, 0, 1).float() / 255 - torch.tensor(ds.mean)[:, None, None]) / torch.tensor(
        ds.std
    )[:, None, None]
    assert torch.allclose(x[0], want, atol=1e-6)
    assert torch.equal(ds[-1][0], ds[11][0])
    with pytest.raises(IndexError):
        ds[12]
    with pytest.raises(IndexError):
        ds.get_batch(torch.tensor([0, 12]))
    assert ds.image(4).mode == "RGB" and np.array_equal(np.asarray(ds.image(4)), ds.images[4].numpy())


def test_in_memory_rejects_bad_input():
    with pytest.raises(DatasetError, match="uint8"):
        InMemoryDataset(torch.zeros(2, 4, 4, 3), [0, 1], ["a", "b"], (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(DatasetError, match="labels"):
        InMemoryDataset(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), [0], ["a", "b"], (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(DatasetError, match="labels outside"):
        InMemoryDataset(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), [0, 2], ["a", "b"], (0.5,) * 3, (0.5,) * 3)


# ---------------------------------------------------------------- batching


def _collect(batches, ds):
    seen = []
    for batch in batches:
        assert batch.ids.dtype == torch.int64 and batch.y.dtype == torch.int64
        want_x, want_y = ds.get_batch(batch.ids)
        assert torch.equal(batch.x, want_x) and torch.equal(batch.y, want_y)
        assert torch.equal(batch.x[0], ds[int(batch.ids[0])][0])  # ids match images
        seen.append(batch.ids)
    return torch.cat(seen)


@pytest.mark.parametrize("shuffle", [False, True])
def test_iter_batches_covers_every_id_once(shuffle):
    ds = load_digits("test")
    ids = _collect(iter_batches(ds, 64, shuffle=shuffle, seed=3), ds)
    assert sorted(ids.tolist()) == list(range(len(ds)))
    assert (ids.tolist() == list(range(len(ds)))) is not shuffle
    assert len_batches(ds, 64) == 6 == len(list(iter_batches(ds, 64)))
    if shuffle:
        again = torch.cat([b.ids for b in iter_batches(ds, 64, shuffle=True, seed=3)])
        other = torch.cat([b.ids for b in iter_batches(ds, 64, shuffle=True, seed=4)])
        assert torch.equal(ids, again) and not torch.equal(ids, other)


def test_iter_batches_subset_and_drop_last():
    ds = load_digits("test")
    subset = np.array([5, 9, 100, 7, 250, 3, 11])
    batches = list(iter_batches(ds, 3, ids=subset, drop_last=True))
    assert [b.ids.tolist() for b in batches] == [[5, 9, 100], [7, 250, 3]]
    assert len_batches(ds, 3, ids=subset, drop_last=True) == 2 and len_batches(ds, 3, ids=subset) == 3
    with pytest.raises(IndexError):
        iter_batches(ds, 3, ids=[0, len(ds)])


# ---------------------------------------------------------------- splits


def _unbalanced_targets():
    rng = np.random.default_rng(1)
    return rng.permutation(np.repeat(np.arange(5), [7, 30, 101, 1, 55]))


def test_class_proportion_split_exact_disjoint_covering_deterministic():
    targets = _unbalanced_targets()
    fraction = np.array([0.5, 0.1, 0.8, 1.0, 0.0])
    a, b = class_proportion_split(targets, fraction, seed=0)
    assert np.intersect1d(a, b).size == 0 and np.array_equal(np.sort(np.concatenate([a, b])), np.arange(len(targets)))
    assert np.all(np.diff(a) > 0) and np.all(np.diff(b) > 0)
    for c, f in enumerate(fraction):
        n_c = (targets == c).sum()
        assert (targets[a] == c).sum() == int(np.floor(f * n_c + 0.5))
    a2, b2 = class_proportion_split(targets, fraction, seed=0)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
    a3, _ = class_proportion_split(targets, fraction, seed=1)
    assert not np.array_equal(a, a3)
    with pytest.raises(DatasetError):
        class_proportion_split(targets, [0.5, 1.5, 0.5, 0.5, 0.5], seed=0)
    with pytest.raises(DatasetError):
        class_proportion_split(targets, [0.5, 0.5], seed=0)


def test_stratified_pair():
    targets = load_digits("all").targets
    a, b = stratified_pair(targets, major=0.8, seed=0)
    assert np.intersect1d(a, b).size == 0 and len(a) + len(b) == len(targets)
    for c in range(10):
        n_c = (targets == c).sum()
        share_a = 0.8 if c < 5 else 0.2
        assert (targets[a] == c).sum() == int(np.floor(share_a * n_c + 0.5))
        assert (targets[b] == c).sum() == n_c - (targets[a] == c).sum()
    a2, _ = stratified_pair(targets, major=0.8, seed=0)
    assert np.array_equal(a, a2)


def test_subset_per_class():
    targets = load_digits("all").targets
    ids = subset_per_class(targets, 5, seed=0)
    assert np.all(np.diff(ids) > 0) and np.bincount(targets[ids], minlength=10).tolist() == [5] * 10
    assert np.array_equal(ids, subset_per_class(targets, 5, seed=0))
    assert not np.array_equal(ids, subset_per_class(targets, 5, seed=1))
    with pytest.raises(DatasetError, match="class 3"):
        subset_per_class(_unbalanced_targets(), 2, seed=0)


# ---------------------------------------------------------------- augmentation


def test_augment_batch_is_a_per_image_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 8, 8, generator=g)
    out = augment_batch(x, torch.Generator().manual_seed(5), pad=2)
    assert out.shape == x.shape
    assert torch.equal(out, augment_batch(x, torch.Generator().manual_seed(5), pad=2))
    assert not torch.equal(out, augment_batch(x, torch.Generator().manual_seed(6), pad=2))
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")  # [B,C,12,12]
    found = set()
    for i in range(len(x)):
        candidates = {(dy, dx, f): padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)
                      for f in (False, True)}
        matches = [key for key, crop in candidates.items() if torch.equal(out[i], crop.flip(2) if key[2] else crop)]
        assert matches, f"image {i} is not a crop of its padded image"
        found.add(matches[0])
    assert len(found) > 5 and {f for _, _, f in found} == {False, True}  # offsets and flips vary per image
    assert torch.equal(augment_batch(x, g, pad=0, flip=False), x)


def test_augment_batch_zero_padding():
    ones = torch.ones(64, 1, 6, 6)
    out = augment_batch(ones, torch.Generator().manual_seed(0), pad=3, flip=False, padding_mode="zeros")
    zero_count = (out == 0).flatten(1).sum(1)  # [B]
    assert set(out.unique().tolist()) == {0.0, 1.0} and len(zero_count.unique()) > 3


# ---------------------------------------------------------------- image folders


def _write_mixed_tree(root: Path, size=(12, 10)):
    """Two classes of 12×10 images in five different modes."""
    w, h = size
    (root / "alpha").mkdir(parents=True)
    (root / "beta").mkdir()
    Image.new("L", size, 77).save(root / "alpha" / "0_grey.png")
    Image.new("RGBA", size, (10, 20, 30, 0)).save(root / "alpha" / "1_rgba.png")
    pal = Image.new("P", size, 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(root / "beta" / "2_palette.png", transparency=0)
    Image.new("CMYK", size, (0, 255, 255, 0)).save(root / "beta" / "3_cmyk.jpg", quality=95)
    Image.fromarray(np.full((h, w), 0x8000, dtype=np.uint16)).save(root / "beta" / "4_grey16.png")
    return root


def test_image_folder_mixed_modes_become_rgb(tmp_path):
    root = _write_mixed_tree(tmp_path / "mixed")
    modes = [Image.open(p).mode for p in sorted(root.rglob("*.*"))]
    assert {"L", "RGBA", "P", "CMYK"} <= set(modes)
    for in_memory in (True, False):
        ds = ImageFolderDataset(root, in_memory=in_memory, workers=1)
        assert ds.preset == "small" and ds.in_memory is in_memory
        assert ds.classes == ["alpha", "beta"] and ds.targets.tolist() == [0, 0, 1, 1, 1]
        assert (ds.num_channels, ds.image_size) == (3, (10, 12))
        x, y = ds.get_batch(torch.arange(len(ds)))
        assert x.shape == (5, 3, 10, 12) and x.dtype == torch.float32 and y.tolist() == [0, 0, 1, 1, 1]
        raw = np.stack([np.asarray(ds.image(i)) for i in range(len(ds))])  # [N,H,W,3]
        assert all(ds.image(i).mode == "RGB" for i in range(len(ds)))
        assert torch.allclose(x, (torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5, atol=1e-6)
        assert raw[0, 0, 0].tolist() == [77, 77, 77]
        assert raw[1, 0, 0].tolist() == [10, 20, 30]
        assert raw[2, 0, 0].tolist() == [200, 100, 50]
        assert np.abs(raw[3, 0, 0].astype(int) - [255, 0, 0]).max() < 12  # CMYK red
        assert raw[4, 0, 0].tolist() == [128, 128, 128]  # 16-bit grey scaled, not clipped
        if in_memory:
            memory_x = x
    assert torch.equal(memory_x, x)  # decoded-in-memory and lazily read batches agree


def test_image_folder_lazy_batches_through_dataloader(tmp_path):
    ds = ImageFolderDataset(_write_mixed_tree(tmp_path / "mixed"), in_memory=False, workers=1)
    assert torch.equal(ds.get_batch([4, 1])[0], torch.stack([ds[4][0], ds[1][0]]))
    for workers in (0, 2):
        ids = _collect(iter_batches(ds, 2, shuffle=True, seed=1, num_workers=workers), ds)
        assert sorted(ids.tolist()) == list(range(5))


def test_image_folder_size_mismatch_names_first_offender(tmp_path):
    root = tmp_path / "sizes"
    (root / "a").mkdir(parents=True)
    for name, size in [("0.png", (8, 8)), ("1.png", (8, 8)), ("2.png", (9, 8)), ("3.png", (7, 7))]:
        Image.new("RGB", size).save(root / "a" / name)
    for in_memory in (True, False):
        with pytest.raises(DatasetError, match=r"2\.png is 9x8"):
            ImageFolderDataset(root, preset="small", in_memory=in_memory, workers=2)


def test_image_folder_imagenet_preset_and_fingerprint(tmp_path):
    root = tmp_path / "big"
    (root / "x").mkdir(parents=True)
    (root / "y").mkdir()
    Image.new("RGB", (300, 200), (255, 0, 0)).save(root / "x" / "a.png")
    Image.new("L", (180, 260), 30).save(root / "y" / "b.jpg")
    ds = ImageFolderDataset(root)
    assert ds.preset == "imagenet" and not ds.in_memory and ds.image_size == (224, 224)
    x, y = ds[0]
    assert x.shape == (3, 224, 224) and y == 0
    red = (1.0 - 0.485) / 0.229
    assert torch.allclose(x[0], torch.full((224, 224), red), atol=1e-5)
    assert ds.image(1).size == (180, 260) and ds.image(1).mode == "RGB"  # raw, not resized
    resident = ImageFolderDataset(root, in_memory=True, workers=1)
    assert torch.equal(resident.get_batch([0, 1])[0], ds.get_batch([0, 1])[0])

    assert ds.fingerprint == ImageFolderDataset(root, in_memory=False).fingerprint
    before = ds.fingerprint
    data = (root / "x" / "a.png").read_bytes()
    (root / "x" / "a.png").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # edited in place, same size
    os.utime(root / "x" / "a.png", ns=(1, 1))
    assert (root / "x" / "a.png").stat().st_size == len(data)
    edited = ImageFolderDataset(root).fingerprint
    assert edited != before
    Image.new("RGB", (300, 200), (0, 0, 255)).save(root / "x" / "c.png")
    assert ImageFolderDataset(root).fingerprint not in (before, edited)
    with pytest.raises(DatasetError, match="preset"):
        ImageFolderDataset(root, preset="huge")


# ---------------------------------------------------------------- missing paths and open_dataset


def test_missing_paths_raise_dataset_error_naming_them(tmp_path):
    missing = tmp_path / "nowhere"
    for call in (lambda: open_dataset(str(missing)), lambda: ImageFolderDataset(missing),
                 lambda: load_jpeg_pack(missing / "x.npz"), lambda: load_cifar10(missing),
                 lambda: open_dataset(f"cifar10:{missing}")):
        with pytest.raises(DatasetError, match="dataset path not found") as info:
            call()
        assert str(missing) in str(info.value)
    with pytest.raises(DatasetError, match=str(tmp_path)):  # exists, but holds no CIFAR-10 files
        load_cifar10(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        ImageFolderDataset(tmp_path / "empty")


def test_open_dataset_dispatch(tmp_path):
    assert open_dataset("digits", split="test").name == "digits" and len(open_dataset("digits", split="test")) == 360
    for split in ("train", "test"):
        _write_mixed_tree(tmp_path / "splits" / split)
    ds = open_dataset(str(tmp_path / "splits"), split="test", workers=1)
    assert isinstance(ds, ImageFolderDataset) and ds.root == tmp_path / "splits" / "test" and ds.name == "splits"
    with pytest.raises(DatasetError, match="'val'"):
        open_dataset(str(tmp_path / "splits"), split="val")
    plain = open_dataset(str(tmp_path / "splits" / "train"), split="ignored-for-a-plain-tree", workers=1)
    assert len(plain) == 5
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match="notes.txt"):
        open_dataset(str(tmp_path / "notes.txt"))


def test_jpeg_pack_rejects_non_pack(tmp_path):
    np.savez(tmp_path / "bad.npz", data=np.zeros(3, np.uint8))
    with pytest.raises(DatasetError, match="offsets"):
        load_jpeg_pack(tmp_path / "bad.npz")


def _write_pack(path: Path, images: list[Image.Image], labels: list[int], classes: list[str]):
    blobs = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=100)
        blobs.append(buf.getvalue())
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(path, data=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
             labels=np.asarray(labels, np.int64), classes=np.asarray(classes))


def test_small_jpeg_pack_roundtrip_and_size_check(tmp_path):
    images = [Image.new("RGB", (6, 4), (40 * k, 0, 255 - 40 * k)) for k in range(6)]
    _write_pack(tmp_path / "toy_test.npz", images, [0, 1, 0, 1, 0, 1], ["even", "odd"])
    ds = open_dataset(str(tmp_path), split="test", workers=2)  # the folder's *_test.npz
    assert (ds.name, len(ds), ds.image_size, ds.classes) == ("toy", 6, (4, 6), ["even", "odd"])
    assert ds.mean == (0.5, 0.5, 0.5) and ds.targets.tolist() == [0, 1, 0, 1, 0, 1]
    want = torch.tensor([[40 * k, 0, 255 - 40 * k] for k in range(6)])  # [6,3] colours written
    assert (ds.images[:, 2, 3].int() - want).abs().max() <= 3
    images[4] = Image.new("RGB", (7, 4))
    _write_pack(tmp_path / "odd.npz", images, [0] * 6, ["a"])
    with pytest.raises(DatasetError, match="packed image 4 is 7x4"):
        load_jpeg_pack(tmp_path / "odd.npz", workers=2)
    with pytest.raises(DatasetError, match="digits takes no options"):
        open_dataset("digits", cache_dir=tmp_path)


# ---------------------------------------------------------------- the real CIFAR-10 test pack


@pytest.fixture(scope="module")
def cifar_test_pack():
    if not TEST_PACK.is_file():
        pytest.skip(f"{TEST_PACK} not available")
    return load_jpeg_pack(TEST_PACK)


@pytest.fixture(scope="module")
def cifar_test_tree(tmp_path_factory):
    """The TEST pack written out as an ImageFolder tree by the dataset's own unpack script."""
    if not TEST_PACK.is_file():
        pytest.skip(f"{TEST_PACK} not available")
    work = tmp_path_factory.mktemp("cifar_tree")
    (work / "packs").mkdir()
    (work / "packs" / TEST_PACK.name).symlink_to(TEST_PACK)  # the script unpacks every pack in a folder
    subprocess.run([sys.executable, str(SHARED / "unpack_imagefolder.py"), str(work / "packs"), str(work / "cifar10")],
                   check=True, capture_output=True)
    return work / "cifar10"  # holds test/<class>/NNNN.jpg


def test_cifar_pack_contents(cifar_test_pack):
    ds = cifar_test_pack
    assert ds.name == "cifar10" and len(ds) == 10_000 and ds.image_size == (32, 32) and ds.num_channels == 3
    assert ds.classes[:3] == ["airplane", "automobile", "bird"] and np.bincount(ds.targets).tolist() == [1000] * 10
    assert ds.mean == CIFAR10_MEAN and ds.std == CIFAR10_STD
    x, _ = ds.get_batch(subset_per_class(ds.targets, 200, seed=0))  # [2000,3,32,32], all classes
    assert x.mean((0, 2, 3)).abs().max() < 0.05 and (x.std((0, 2, 3)) - 1).abs().max() < 0.05


def test_cifar_pack_agrees_with_image_folder(cifar_test_pack, cifar_test_tree):
    pack = cifar_test_pack
    tree = open_dataset(str(cifar_test_tree), split="test", mean=CIFAR10_MEAN, std=CIFAR10_STD)
    assert isinstance(tree, ImageFolderDataset) and tree.in_memory and tree.name == "cifar10"
    assert tree.classes == pack.classes and np.array_equal(tree.targets, pack.targets)
    for a, b in zip(iter_batches(pack, 2500), iter_batches(tree, 2500)):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.y, b.y) and torch.equal(a.x, b.x)
    for i in (0, 4321, 9999):
        assert np.array_equal(np.asarray(tree.image(i)), np.asarray(pack.image(i)))


def test_cifar_pack_cache_and_directory_spec(cifar_test_pack, tmp_path):
    cache = tmp_path / "cache"
    key = hashlib.sha256(TEST_PACK.read_bytes()).hexdigest()
    first = load_jpeg_pack(TEST_PACK, cache_dir=cache, workers=1)
    assert [p.name for p in cache.iterdir()] == [f"{key}.npy"]  # no temporary files left behind
    assert torch.equal(first.images, cifar_test_pack.images)
    np.save(cache / f"{key}.npy", np.zeros((10_000, 32, 32, 3), np.uint8))  # prove the next load reads the cache
    cached = open_dataset(str(TEST_PACK.parent), split="test", cache_dir=cache)
    assert len(cached) == 10_000 and int(cached.images.max()) == 0


class _SlowFirstImages(torch.utils.data.Dataset):
    """A lazy dataset whose first images take longest to load, so that worker processes finish out of order."""

    in_memory = False

    def __init__(self, n=12):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import time
        time.sleep(0.05 if i < 3 else 0.0)
        return torch.full((3, 2, 2), float(i)), i % 3


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_give_the_batches_of_one_process_in_order(workers):
    ds = _SlowFirstImages()
    want = [(c, torch.stack([ds[int(i)][0] for i in c])) for c in torch.arange(ds.n).split(3)]
    got = list(iter_batches(ds, 3, num_workers=workers))
    assert [b.ids.tolist() for b in got] == [c.tolist() for c, _ in want]
    assert all(torch.equal(b.x, x) for b, (_, x) in zip(got, want))


def test_workers_default_is_the_process_setting(tmp_path, monkeypatch):
    from mergescope.data import default_workers, set_workers
    from mergescope.data.pool import cpu_count

    monkeypatch.setattr("mergescope.data.loader._workers", None)
    assert default_workers() == cpu_count()
    set_workers(0)
    assert default_workers() == 0
    with pytest.raises(ValueError, match="workers"):
        set_workers(-1)
    ds = ImageFolderDataset(_write_mixed_tree(tmp_path / "mixed"), in_memory=False, workers=0)
    set_workers(2)
    two = list(iter_batches(ds, 2))
    set_workers(0)
    assert all(torch.equal(a.x, b.x) and torch.equal(a.ids, b.ids) for a, b in zip(two, iter_batches(ds, 2)))


def test_cli_workers_option_sets_the_process_default(tmp_path, monkeypatch):
    from mergescope.cli import main
    from mergescope.data import default_workers

    monkeypatch.setattr("mergescope.data.loader._workers", None)
    with pytest.raises(SystemExit):
        main(["sweep", "--workers", "-1"])
    # --workers is parsed and applied before the command runs (which then fails on its missing checkpoints)
    main(["sweep", "nowhere_a.safetensors", "nowhere_b.safetensors", "--data", "digits", "--workers", "3", "--quiet",
          "--out", str(tmp_path / "run")])
    assert default_workers() == 3


def test_small_tree_opened_twice_is_decoded_once(tmp_path, monkeypatch):
    import mergescope.data.folder as folder

    root = tmp_path / "t"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * j, np.uint8)).save(root / c / f"{j}.png")
    calls = []
    real = folder.decode_files
    monkeypatch.setattr(folder, "decode_files", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = ImageFolderDataset(root, workers=0)
    once = len(calls)  # decode_files calls (one per chunk) of one decoding
    second = ImageFolderDataset(root, workers=0)
    assert once > 0 and len(calls) == once and torch.equal(first.get_batch([0, 5])[0], second.get_batch([0, 5])[0])
    os.utime(root / "a" / "0.png", ns=(1, 1))  # touched: decoded again
    ImageFolderDataset(root, workers=0)
    assert len(calls) == 2 * once
