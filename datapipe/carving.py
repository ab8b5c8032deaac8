"""Carving val out of train, and K folds: seeded, pure functions of (rows, spec, seed).

A lightning-bolts style ``val_split`` is an int (that many samples) or a float in
[0, 1) (``int(n * val_split)`` samples) carved with a seeded permutation
(:func:`carve`); :class:`PerClass` carves that many samples of every class
(lightning-bolts' ImageNet ``num_imgs_per_val_class``); :class:`Stratified` a count or
fraction in which every class keeps its share; :class:`Folds` cuts train into K
seeded folds (:func:`assign_folds`). Each algorithm has a name recorded in every
plan's provenance, so a change of algorithm gives new plan ids, never silently
different indices.

Pure: standard library and numpy only.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from datapipe.errors import ConfigError

#: Names the permutation used by :func:`carve`; part of every plan's provenance, so a
#: change of algorithm gives new plan ids instead of silently different indices.
ALGORITHM = "numpy-pcg64-permutation-v1"
#: Names the per-class carve (:func:`carve_per_class`); recorded with a PerClass val.
PER_CLASS_ALGORITHM = "numpy-pcg64-permutation-stable-by-label-v1"
#: Names the stratified carve (:func:`carve_stratified`); recorded with a Stratified val.
STRATIFIED_ALGORITHM = "numpy-pcg64-largest-remainder-by-label-v1"
#: Names the fold assignment (:func:`assign_folds`); recorded with a Folds val.
FOLDS_ALGORITHM = "numpy-pcg64-round-robin-folds-v1"


def val_number(val: Any, what: str = "val_split") -> int | float:
    """A count (int >= 0) or a fraction (float in [0, 1)) of samples for val, checked.

    The one check of a numeric val: the carve (:func:`carve`) and the provenance
    (:func:`plan_provenance`) both go through it. ``what`` names the argument.
    """
    if isinstance(val, (bool, np.bool_)):
        raise ConfigError(
            f"{what}={val!r} is a bool; give a number of samples (5000) or a "
            f"fraction in [0, 1) (0.1)"
        )
    if isinstance(val, numbers.Integral):
        if val < 0:
            raise ConfigError(f"{what}={val} is negative; give a number of samples >= 0")
        return int(val)
    if isinstance(val, numbers.Real):
        f = float(val)
        if not (0.0 <= f < 1.0):  # also rejects nan
            raise ConfigError(
                f"{what}={val!r} is a fraction outside [0, 1); give a fraction like "
                f"0.1 or a number of samples like 5000"
            )
        return f
    raise ConfigError(
        f"{what}={val!r} is not a number; give a number of samples (5000) or a "
        f"fraction in [0, 1) (0.1)"
    )


def val_count(n: int, val_split: Any) -> int:
    """How many of ``n`` samples ``val_split`` asks for; raises ConfigError if unusable."""
    v = val_number(val_split)
    if isinstance(v, int):
        if v > 0 and v >= n:
            raise ConfigError(
                f"val_split={v} leaves no training samples out of {n}; give fewer than {n} "
                f"samples or a fraction in [0, 1)"
            )
        return v
    count = int(n * v)
    if v > 0 and count == 0:
        raise ConfigError(
            f"val_split={v:g} of {n} samples gives an empty validation set; give a "
            f"larger fraction or a number of samples"
        )
    return count


def check_seed(seed: Any) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be a non-negative integer")
    return int(seed)


def carve(indices: np.ndarray, val_split: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (train, val) with a seeded permutation.

    lightning-bolts semantics: an int ``val_split`` is the number of val samples, a
    float in [0, 1) the fraction ``int(n * val_split)``. With
    ``perm = np.random.default_rng(seed).permutation(n)``, the first ``n - n_val``
    positions of ``perm`` are train and the rest val (the shape of torch's
    ``random_split([n - v, v])``). Both parts are returned sorted (the loader
    shuffles anyway; sorted rows read memory maps with better locality) as int64.
    ``val_split=0`` gives an empty val. Unusable values raise :class:`ConfigError`.
    """
    arr = np.asarray(indices)
    if arr.ndim != 1 or not (arr.dtype.kind in "iu" or arr.size == 0):
        raise ConfigError(
            f"carve needs a 1-D array of integer indices, got shape {arr.shape} dtype {arr.dtype}"
        )
    arr = arr.astype(np.int64, copy=False)
    n = int(arr.size)
    n_val = val_count(n, val_split)
    perm = np.random.default_rng(check_seed(seed)).permutation(n)
    train = np.sort(arr[perm[: n - n_val]])
    val = np.sort(arr[perm[n - n_val :]])
    return train, val


@dataclass(frozen=True)
class PerClass:
    """A val split of ``count`` samples of every class, carved from train (seeded)."""

    count: int

    def __post_init__(self) -> None:
        if (isinstance(self.count, (bool, np.bool_)) or not isinstance(self.count, numbers.Integral)
                or self.count < 0):
            raise ConfigError(f"a per-class val count must be an integer >= 0, got "
                              f"{self.count!r}")


def carve_per_class(labels: np.ndarray, per_class: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..n-1`` into (train, val) with ``per_class`` val samples per class.

    With ``perm = np.random.default_rng(seed).permutation(n)``, the positions are
    grouped by label, stably, in ``perm`` order, and the first ``per_class`` of each
    class go to val: lightning-bolts' shuffle-then-take-the-first-k, seeded. Both
    parts are returned sorted (int64). A class with no more than ``per_class``
    samples would leave train without it: :class:`ConfigError`.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (labels.dtype.kind in "iu" or labels.size == 0):
        raise ConfigError(f"carve_per_class needs 1-D integer labels, got shape {labels.shape} "
                          f"dtype {labels.dtype}")
    per_class = PerClass(per_class).count
    values, counts = np.unique(labels, return_counts=True)
    short = values[counts <= per_class]
    if per_class and short.size:
        raise ConfigError(
            f"{per_class} validation samples per class would take every sample of class "
            f"{int(short[0])} ({int(counts[values == short[0]][0])} samples); give a smaller count"
        )
    n = labels.size
    perm = np.random.default_rng(check_seed(seed)).permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]
    grouped = labels[order]
    rank = np.arange(n) - np.searchsorted(grouped, grouped, side="left")
    val = np.sort(order[rank < per_class]).astype(np.int64)
    train = np.sort(order[rank >= per_class]).astype(np.int64)
    return train, val


@dataclass(frozen=True)
class Stratified:
    """A val split of ``val_split`` samples (a count or a fraction) in which every class
    keeps its share of train; carved with :func:`carve_stratified`."""

    val_split: int | float

    def __post_init__(self) -> None:
        if isinstance(self.val_split, (bool, np.bool_)) or not isinstance(self.val_split,
                                                                          numbers.Real):
            raise ConfigError(f"a stratified val_split is a number of samples or a fraction, "
                              f"not {self.val_split!r}")


def _class_counts(labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not (labels.dtype.kind in "iu" or labels.size == 0):
        raise ConfigError(f"{what} needs 1-D integer labels, got shape {labels.shape} "
                          f"dtype {labels.dtype}")
    return np.unique(labels, return_inverse=True, return_counts=True)


def _grouped_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions grouped by label (ascending), in a seeded random order within each class."""
    perm = rng.permutation(labels.size)
    return perm[np.argsort(labels[perm], kind="stable")]


def carve_stratified(labels: np.ndarray, val_split: int | float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..n-1`` into (train, val) so that every class keeps its share.

    ``n_val`` follows :func:`carve` (an int is a count, a float the fraction
    ``int(n * val_split)``). Class ``c`` with ``n_c`` samples gives ``floor(q_c)`` or
    ``ceil(q_c)`` samples to val, ``q_c = n_val * n_c / n`` (its exact share; largest
    remainders get the ceiling, ties broken by a seeded draw), so the val counts add up
    to ``n_val`` and each is within 1 of its exact share, as sklearn's
    ``train_test_split(stratify=...)``. Which samples of a class go to val is a seeded
    permutation. Like sklearn, a class with a single sample is refused (it could not be
    on both sides), and so is a carve that would leave a class without training samples.
    """
    values, inverse, counts = _class_counts(labels, "a stratified carve")
    n = int(inverse.size)
    n_val = val_count(n, val_split)
    rng = np.random.default_rng(check_seed(seed))
    order = _grouped_order(inverse, rng)
    tie_break = rng.permutation(values.size)
    if n_val and counts.min() < 2:
        c = int(np.argmin(counts))
        raise ConfigError(f"class {int(values[c])} has only 1 sample; a stratified val split "
                          f"needs at least 2 of every class (as sklearn); use stratify=False")
    exact = n_val * counts / n if n else counts * 0.0
    take = np.floor(exact).astype(np.int64)
    short = n_val - int(take.sum())
    if short:
        # Largest remainder first; among equal remainders, the seeded draw decides.
        ranked = np.lexsort((tie_break, -(exact - take)))
        take[ranked[:short]] += 1
    starved = np.flatnonzero(take >= counts)
    if n_val and starved.size:
        c = int(starved[0])
        raise ConfigError(f"val_split={val_split!r} would put all {int(counts[c])} samples of "
                          f"class {int(values[c])} into val; give a smaller val_split")
    grouped = inverse[order]
    rank = np.arange(n) - np.searchsorted(grouped, grouped, side="left")
    in_val = rank < take[grouped]
    return (np.sort(order[~in_val]).astype(np.int64),
            np.sort(order[in_val]).astype(np.int64))


@dataclass(frozen=True)
class Folds:
    """K seeded folds of the train split: fold ``fold`` is val, the other K-1 are train.

    ``fold=None`` names the whole K-fold plan (:meth:`SplitPlan.for_fold` picks one).
    ``stratify`` keeps every class's share in every fold (sklearn's StratifiedKFold).
    """

    k: int
    fold: int | None = None
    stratify: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.k, (bool, np.bool_)) or not isinstance(self.k, numbers.Integral) \
                or self.k < 2:
            raise ConfigError(f"folds={self.k!r} must be an integer >= 2 (the number of "
                              f"cross-validation folds)")
        if self.fold is not None and (
                isinstance(self.fold, (bool, np.bool_))
                or not isinstance(self.fold, numbers.Integral) or not 0 <= self.fold < self.k):
            raise ConfigError(f"fold={self.fold!r} must be an integer in 0..{self.k - 1} "
                              f"(one of the {self.k} folds)")
        if not isinstance(self.stratify, (bool, np.bool_)):
            raise ConfigError(f"stratify={self.stratify!r} must be True or False")


def assign_folds(n: int, k: int, seed: int,
                 labels: np.ndarray | None = None) -> np.ndarray:
    """The fold (0..k-1) of each of ``n`` positions: seeded, sizes within 1 of each other.

    With ``order`` a seeded permutation of the positions (grouped by class, ascending,
    when ``labels`` are given), position ``order[j]`` goes to fold ``j % k``. So fold
    sizes differ by at most 1 (the first ``n % k`` folds hold one more, as sklearn's
    KFold), and with labels each class's count differs by at most 1 between folds
    (sklearn's StratifiedKFold). Stratified folds need every class to have at least
    ``k`` samples (sklearn warns; a fold without a class is refused here).
    """
    folds = Folds(k)
    k = int(folds.k)
    rng = np.random.default_rng(check_seed(seed))
    if labels is None:
        if n < k:
            raise ConfigError(f"folds={k} needs at least {k} training samples; the train "
                              f"split has {n}")
        order = rng.permutation(n)
    else:
        values, inverse, counts = _class_counts(labels, "stratified folds")
        if inverse.size != n:
            raise ConfigError(f"stratified folds got {inverse.size} labels for {n} samples")
        if n and counts.min() < k:
            c = int(np.argmin(counts))
            raise ConfigError(
                f"folds={k} with stratify needs at least {k} samples of every class; class "
                f"{int(values[c])} has only {int(counts[c])} (sklearn's StratifiedKFold "
                f"refuses this too); use at most {int(counts[c])} folds or stratify=False")
        order = _grouped_order(inverse, rng)
    assignment = np.empty(n, dtype=np.int64)
    assignment[order] = np.arange(n) % k
    return assignment
