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


def stratified_subset(targets, size: int, seed: int = 0, exclude=None) -> np.ndarray:
    """``size`` random images spread as evenly as the classes allow, e.g. 5,000 images of ImageNet's 1,000
    classes = 5 per class (the thesis's regression subset, 000 §3.2.4), 500 per class of CIFAR-10.

    Every class gets ``q`` images (fewer if it has fewer: all of them), with ``q`` the largest count that keeps the
    total at most ``size``; the images still missing go one each to classes with images left, in a random order
    (``seed``). Images are drawn at random within each class. ``size`` at least the number of candidates takes them
    all (capped by the dataset).

    Args:
        targets: int labels [N].
        size: images wanted (≥ 1).
        seed: random seed.
        exclude: ids that may not be drawn (e.g. a fitting subset, to draw a disjoint held-out set).

    Returns:
        Sorted int64 ids.
    """
    if size < 1:
        raise DatasetError(f"a subset needs at least 1 image, got size={size}")
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    free = np.ones(len(targets), dtype=bool)
    if exclude is not None:
        free[np.asarray(exclude, dtype=np.int64)] = False
    labels = np.unique(targets[free])
    members = [np.flatnonzero(free & (targets == label)) for label in labels]
    counts = np.array([len(m) for m in members])
    if size >= counts.sum():
        return np.flatnonzero(free)
    q = 0  # largest per-class quota with sum(min(counts, q)) <= size
    for c in np.unique(counts):
        if np.minimum(counts, c).sum() > size:
            break
        q = int(c)
    q += int((size - np.minimum(counts, q).sum()) // (counts > q).sum())  # up to the next class size
    take = np.minimum(counts, q)
    spare = np.flatnonzero(take < counts)
    extra = np.random.default_rng([seed, len(labels)]).permutation(spare)[: size - int(take.sum())]
    take[extra] += 1
    chosen = [_class_rng(seed, int(label)).permutation(m)[:t] for label, m, t in zip(labels, members, take)]
    return np.sort(np.concatenate(chosen))
