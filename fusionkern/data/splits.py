"""The paper's evaluation protocol: five stratified train / validation / test splits and the class weights.

Paper section II-C: 20 % of the sites are held out for testing, the remaining 80 % are split 80 / 20 into
training and validation, each stratified by class; the whole is repeated with five different splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fusionkern import CLASSES
from fusionkern.errors import ConfigError

CLASS_WEIGHTS = (3.0, 1.0)
"""Cross-entropy weights (cement, landcover) that offset the 1 : 4 class imbalance (paper section II-C)."""

MIN_PER_CLASS = 3
"""Fewest sites of a class that put at least one in each of train, validation and test."""


@dataclass(frozen=True)
class Split:
    """One stratified split: sorted, disjoint site indices that together cover the dataset.

    Attributes:
        train: Indices of the training sites.
        val: Indices of the validation sites.
        test: Indices of the test sites.
        seed: Seed of the generator that drew this split.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int


def stratified_splits(
    labels: Sequence[int] | np.ndarray,
    n_splits: int = 5,
    test_fraction: float = 0.2,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> list[Split]:
    """Draw the paper's stratified splits.

    Within each class, ``round(n * test_fraction)`` sites go to test and ``round(rest * val_fraction)`` of the
    rest to validation, each at least one, so every part keeps the class proportions to within one site per
    class. Split ``k`` is drawn with its own generator seeded ``seed + k``.

    Args:
        labels: Class index of every site.
        n_splits: Number of independent splits.
        test_fraction: Share of each class held out for testing.
        val_fraction: Share of each class's remaining sites used for validation.
        seed: Seed of the first split.

    Returns:
        ``n_splits`` splits.

    Raises:
        ConfigError: An argument is out of range, or a class has fewer than three sites.
    """
    labels = _check_labels(labels)
    _check_fractions(n_splits, test_fraction, val_fraction)
    classes = np.unique(labels)
    for cls in classes:
        count = int(np.sum(labels == cls))
        if count < MIN_PER_CLASS:
            raise ConfigError(
                f"class {_class_name(cls)} has {count} site(s); a stratified train/validation/test split needs"
                f" at least {MIN_PER_CLASS} per class (one in each part)"
            )
    return [_one_split(labels, classes, test_fraction, val_fraction, seed + k) for k in range(n_splits)]


def _one_split(labels: np.ndarray, classes: np.ndarray, test_fraction: float, val_fraction: float, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for cls in classes:
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = _share(len(members), test_fraction)
        n_val = _share(len(members) - n_test, val_fraction)
        for part, chunk in zip(parts, np.split(members, [len(members) - n_test - n_val, len(members) - n_test])):
            part.append(chunk)
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    return Split(train=train, val=val, test=test, seed=seed)


def _share(count: int, fraction: float) -> int:
    """Rounded share of ``count``, at least one and leaving at least one behind."""
    return min(max(int(round(count * fraction)), 1), count - 1)


def _check_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"labels must be a non-empty 1-D sequence of class indices, got shape {labels.shape}")
    return labels


def _check_fractions(n_splits: int, test_fraction: float, val_fraction: float) -> None:
    if n_splits < 1:
        raise ConfigError(f"n_splits must be at least 1, got {n_splits}")
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 < value < 1.0:
            raise ConfigError(f"{name} must lie strictly between 0 and 1, got {value}")


def _class_name(cls: int) -> str:
    return CLASSES[cls] if 0 <= cls < len(CLASSES) else str(int(cls))
