"""bench/scaling.py's n-image packs: n/10 images of each class, evenly spaced, their JPEG bytes untouched."""

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mergescope.data import load_jpeg_pack

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("bench_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def write_pack(path: Path, per_class: int, classes: int = 10) -> None:
    """A pack ordered by class (as CIFAR-10's): image j of class c is a flat colour that names (c, j)."""
    blobs, labels = [], []
    for c in range(classes):
        for j in range(per_class):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (25 * c, 40 * j, 128)).save(buf, format="PNG")  # lossless: pixels name it
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
            labels.append(c)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    np.savez(path, data=np.concatenate(blobs), offsets=offsets, labels=np.array(labels, np.int64),
             classes=np.array([f"c{c}" for c in range(classes)]))


def test_subset_pack_takes_evenly_spaced_images_of_every_class(scaling, tmp_path):
    source = tmp_path / "toy_train.npz"
    write_pack(source, per_class=6)
    out = scaling.subset_pack(source, 20, tmp_path / "sub")
    assert out.name == source.name  # the loader names the dataset (and picks its statistics) from the file name
    whole, sub = load_jpeg_pack(source, workers=0), load_jpeg_pack(out, workers=0)
    assert len(sub) == 20 and np.bincount(sub.targets, minlength=10).tolist() == [2] * 10
    ids = [6 * c + j for c in range(10) for j in (0, 3)]  # 2 of 6 per class: positions 0 and 3
    for k, i in enumerate(ids):
        assert np.array_equal(np.asarray(sub.image(k)), np.asarray(whole.image(i))), (k, i)
        assert sub.targets[k] == whole.targets[i]
    assert scaling.subset_pack(source, 60, tmp_path / "all") == source  # the whole pack: the pack itself
    with pytest.raises(SystemExit, match="--images: 25"):
        scaling.subset_pack(source, 25, tmp_path / "odd")
