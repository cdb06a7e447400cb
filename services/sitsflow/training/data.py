"""Preparing the learning + validation (L+V) samples for training: the polygon-wise learning /
validation split and the class weights. The database itself (format, readers, statistics and
:class:`~sitsflow.samples.SampleSet`) is :mod:`sitsflow.samples`.
"""

from __future__ import annotations

import math

import numpy as np

VALIDATION_FRACTION = 0.2


# --- split and weights -----------------------------------------------------------------------
def split_learn_validation(
    labels: np.ndarray,
    polygon_ids: np.ndarray | None,
    seed: int,
    validation_fraction: float = VALIDATION_FRACTION,
) -> tuple[np.ndarray, np.ndarray]:
    """Polygon-wise, class-stratified split of L+V into learning (80 %) and validation (20 %).

    Each polygon (or, without polygon ids, each sample) is a group whose class is its most
    frequent label (ties: the smallest code). Per class, its groups (sorted by id) are permuted
    with ``numpy.random.default_rng(seed)``; ``n_val = min(n - 1, max(1, round(0.2 n)))`` of them
    go to validation, the rest to learning, so every class with >= 2 polygons has one in
    validation. A class with a single polygon puts it in both sets (as iota2 does).

    Args:
        labels: class codes, shape (n,).
        polygon_ids: polygon of each sample, shape (n,), or None.
        seed: split seed.

    Returns:
        (learn_mask, validation_mask), boolean arrays of shape (n,).
    """
    n = labels.shape[0]
    groups = polygon_ids if polygon_ids is not None else np.arange(n, dtype=np.int64)
    uniq, inverse = np.unique(groups, return_inverse=True)
    # majority label per group
    pairs, counts = np.unique(np.stack([inverse, labels]), axis=1, return_counts=True)
    group_class = np.empty(uniq.shape[0], dtype=np.int64)
    best = np.full(uniq.shape[0], -1, dtype=np.int64)
    for (g, lab), cnt in zip(pairs.T.tolist(), counts.tolist(), strict=True):
        if cnt > best[g] or (cnt == best[g] and lab < group_class[g]):
            best[g] = cnt
            group_class[g] = lab
    rng = np.random.default_rng(seed)
    learn_group = np.zeros(uniq.shape[0], dtype=bool)
    val_group = np.zeros(uniq.shape[0], dtype=bool)
    for cls in np.unique(group_class):
        members = np.flatnonzero(group_class == cls)  # already sorted by polygon id
        k = members.shape[0]
        if k == 1:
            learn_group[members] = True
            val_group[members] = True
            continue
        perm = members[rng.permutation(k)]
        n_val = min(k - 1, max(1, int(math.floor(validation_fraction * k + 0.5))))
        val_group[perm[:n_val]] = True
        learn_group[perm[n_val:]] = True
    return learn_group[inverse], val_group[inverse]


def class_weights(label_idx: np.ndarray, nb_classes: int) -> np.ndarray:
    """Inverse class proportions on L+V: ``w_c = 1 / p_c = n / n_c`` (0 for an absent class).

    With 80 % of class 1 and 20 % of class 2 the weights are 1.25 and 5 (reference example).

    Args:
        label_idx: class indices, shape (n,).
    Returns:
        float32 array of shape (nb_classes,).
    """
    counts = np.bincount(label_idx, minlength=nb_classes).astype(np.float64)
    n = counts.sum()
    with np.errstate(divide="ignore"):
        w = np.where(counts > 0, n / np.maximum(counts, 1), 0.0)
    return w.astype(np.float32)
