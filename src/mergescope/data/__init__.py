"""Index-stable image datasets: every image has a fixed integer id (its index), batch access by ids."""

from mergescope.data.augment import augment_batch
from mergescope.data.base import ImageDataset
from mergescope.data.cifar import load_cifar10, load_jpeg_pack
from mergescope.data.digits import digits_split_ids, load_digits
from mergescope.data.folder import ImageFolderDataset
from mergescope.data.loader import (Batch, decode_device, default_workers, iter_batches, len_batches,
                                    set_decode_device, set_workers)
from mergescope.data.memory import InMemoryDataset
from mergescope.data.normalize import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from mergescope.data.open import open_dataset
from mergescope.data.splits import class_proportion_split, stratified_pair, stratified_subset, subset_per_class

__all__ = [
    "Batch",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDataset",
    "ImageFolderDataset",
    "InMemoryDataset",
    "augment_batch",
    "class_proportion_split",
    "decode_device",
    "default_workers",
    "digits_split_ids",
    "iter_batches",
    "len_batches",
    "load_cifar10",
    "load_digits",
    "load_jpeg_pack",
    "open_dataset",
    "set_decode_device",
    "set_workers",
    "stratified_pair",
    "stratified_subset",
    "subset_per_class",
]
