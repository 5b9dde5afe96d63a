"""One entry point that turns a dataset spec string into an ImageDataset."""

from pathlib import Path

from mergescope.data.base import ImageDataset
from mergescope.data.cifar import load_cifar10, load_jpeg_pack
from mergescope.data.digits import load_digits
from mergescope.data.folder import SPLIT_DIRS, ImageFolderDataset
from mergescope.errors import DatasetError
from mergescope.timing import staged

CIFAR10_PREFIX = "cifar10:"


def _pack_for_split(directory: Path, split: str) -> Path | None:
    """The single ``*_<split>.npz`` pack in ``directory``, or None if there is none."""
    packs = sorted(directory.glob(f"*_{split}.npz"))
    if len(packs) > 1:
        raise DatasetError(f"several {split} packs in {directory}: {', '.join(p.name for p in packs)}")
    return packs[0] if packs else None


def has_split(spec: str, split: str) -> bool:
    """Whether ``spec`` names a dataset with a split of its own called ``split`` (``open_dataset`` gives a single
    pack or a plain ImageFolder tree for every split, so "test" of such a spec is the training images)."""
    if spec == "digits" or spec.startswith(CIFAR10_PREFIX):
        return split in ("train", "test")
    path = Path(spec).expanduser()
    return path.is_dir() and (_pack_for_split(path, split) is not None or (path / split).is_dir())


@staged("decode")  # a pack or a small tree is decoded here, once
def open_dataset(spec: str, split: str = "train", **kw) -> ImageDataset:
    """Open a dataset by spec.

    Args:
        spec: one of
            ``"digits"`` — scikit-learn's 8×8 digits;
            ``"cifar10:<root>"`` — torchvision's CIFAR-10 files under root (``download=True`` to fetch);
            a ``.npz`` JPEG pack, or a folder of packs named ``*_<split>.npz`` (e.g. ``cifar10_test.npz``);
            an ImageFolder tree (class sub-folders), or a folder with ``train/``, ``test/`` (``val/``) trees.
        split: which split of a multi-split spec ("train", "test"; digits also "all").
        **kw: passed to the loader (``download``; ``cache_dir``; ``preset``, ``in_memory``, ``mean``, ``std``...).

    Returns:
        The dataset.
    """
    if spec == "digits":
        if kw:
            raise DatasetError(f"digits takes no options, got {', '.join(sorted(kw))}")
        return load_digits(split)
    if spec.startswith(CIFAR10_PREFIX):
        return load_cifar10(spec[len(CIFAR10_PREFIX):], split, **kw)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset path not found: {path}")
    if path.is_file():
        if path.suffix != ".npz":
            raise DatasetError(f"not a dataset file (expected a .npz JPEG pack or a folder): {path}")
        return load_jpeg_pack(path, **kw)
    pack = _pack_for_split(path, split)
    if pack is not None:
        return load_jpeg_pack(pack, **kw)
    if (path / split).is_dir():
        return ImageFolderDataset(path / split, **kw)
    present = [d for d in SPLIT_DIRS if (path / d).is_dir()]
    if present:
        raise DatasetError(f"no {split!r} split in {path} (found {', '.join(present)})")
    return ImageFolderDataset(path, **kw)
