"""Deterministic ways to divide a labelled dataset's ids: per-class proportions and per-class subsets."""

import numpy as np

from mergescope.errors import DatasetError


def _class_rng(seed: int, label: int) -> np.random.Generator:
    """A random stream per (seed, class), so one class's draw does not depend on the others."""
    return np.random.default_rng([seed, label])


def class_proportion_split(targets, fraction_a, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Send a random ``fraction_a[c]`` of each class ``c`` to part A and the rest to part B.

    Per class, ``floor(fraction_a[c] * n_c + 0.5)`` images go to A (round half up).

    Args:
        targets: int labels [N] in ``0..len(fraction_a)-1``.
        fraction_a: per-class fractions in [0, 1], [K].
        seed: random seed.

    Returns:
        (ids_a, ids_b): sorted int64 arrays, disjoint, together covering ``0..N-1``.
    """
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    fraction_a = np.asarray(fraction_a, dtype=np.float64).reshape(-1)
    if np.any((fraction_a < 0) | (fraction_a > 1)):
        raise DatasetError(f"class fractions must lie in [0, 1], got {fraction_a.tolist()}")
    if targets.size and (targets.min() < 0 or targets.max() >= len(fraction_a)):
        raise DatasetError(f"labels run to {targets.max()} but only {len(fraction_a)} class fractions were given")
    in_a = np.zeros(len(targets), dtype=bool)
    for label, fraction in enumerate(fraction_a):
        members = np.flatnonzero(targets == label)
        take = int(np.floor(fraction * len(members) + 0.5))
        in_a[_class_rng(seed, label).permutation(members)[:take]] = True
    return np.flatnonzero(in_a), np.flatnonzero(~in_a)


def stratified_pair(targets, major: float = 0.8, seed: int = 0,
                    num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The "stratified" split of two-model experiments: each part over-represents half the classes.

    A gets ``major`` of the images of the first ``ceil(K/2)`` classes and ``1 - major`` of the others;
    B gets the complement.

    Args:
        targets: int labels [N].
        major: share of its favoured classes each part gets.
        seed: random seed.
        num_classes: K (default: ``max(targets) + 1``).

    Returns:
        (ids_a, ids_b): sorted int64 arrays, disjoint and covering.
    """
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    k = int(targets.max()) + 1 if num_classes is None else num_classes
    fraction_a = np.where(np.arange(k) < (k + 1) // 2, major, 1.0 - major)  # [K]
    return class_proportion_split(targets, fraction_a, seed)


def subset_per_class(targets, per_class: int, seed: int = 0) -> np.ndarray:
    """``per_class`` random images of every class present in ``targets``.

    Args:
        targets: int labels [N].
        per_class: images per class; a class with fewer raises DatasetError.
        seed: random seed.

    Returns:
        Sorted int64 ids.
    """
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    chosen = []
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        if len(members) < per_class:
            raise DatasetError(f"class {label} has only {len(members)} images, fewer than per_class={per_class}")
        chosen.append(_class_rng(seed, int(label)).choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)
