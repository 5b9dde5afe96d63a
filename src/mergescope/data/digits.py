"""scikit-learn's embedded 8×8 handwritten digits (1,797 images, no download) as an ImageDataset."""

from functools import lru_cache

import numpy as np

from mergescope.data.memory import InMemoryDataset
from mergescope.errors import DatasetError

TEST_FRACTION = 0.2
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    """All images as uint8 [1797, 8, 8, 1] (0..16 scaled to 0..255) and int64 labels [1797]."""
    from sklearn.datasets import load_digits as sklearn_digits  # here: sklearn takes ~1 s to import

    bunch = sklearn_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # [N,8,8,1]
    return pixels, bunch.target.astype(np.int64)


def digits_split_ids(split: str = "train") -> np.ndarray:
    """Indices into the full 1,797-image set that make up ``split``.

    The split is fixed: sklearn ``train_test_split`` with ``test_size=0.2``, ``random_state=0``,
    stratified by label (1,437 train / 360 test), each part sorted ascending.

    Args:
        split: "train", "test" or "all".

    Returns:
        int64 [n] sorted indices.
    """
    _, labels = _all_digits()
    everything = np.arange(len(labels), dtype=np.int64)
    if split == "all":
        return everything
    if split not in ("train", "test"):
        raise DatasetError(f"digits has splits train/test/all, not {split!r}")
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(everything, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels)
    return np.sort(train if split == "train" else test)


def load_digits(split: str = "train") -> InMemoryDataset:
    """The digits dataset: 1 channel, 8×8, normalized with the mean/std of all 1,797 images.

    Args:
        split: "train" (1,437), "test" (360) or "all" (1,797); ids index into the split.

    Returns:
        InMemoryDataset named "digits".
    """
    pixels, labels = _all_digits()
    ids = digits_split_ids(split)
    scaled = pixels / 255.0
    mean, std = (float(scaled.mean()),), (float(scaled.std()),)
    return InMemoryDataset(pixels[ids], labels[ids], [str(d) for d in range(10)], mean, std, name="digits")
