"""Share training samples out over nodes: IID, label-skewed by a Dirichlet draw per class, or
``shards`` (each node a few classes).

Pure numpy; every rank calls these with the same seeded generator and gets the same parts.
Each part is a sorted int64 array of sample indices; every index is in exactly one part.
"""

from __future__ import annotations

import math

import numpy as np


def partition_iid(n_samples: int, n_nodes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation of the samples cut into ``n_nodes`` parts whose sizes differ by at
    most one."""
    _check_counts(n_samples, n_nodes)
    perm = rng.permutation(n_samples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(perm, n_nodes)]


def partition_dirichlet(
    labels: np.ndarray,
    n_nodes: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_per_node: int = 1,
) -> list[np.ndarray]:
    """Label skew: each class's (shuffled) samples are split over the nodes in proportions drawn
    from ``Dirichlet(alpha * 1)``; smaller ``alpha``, more skew. Then, while some node holds fewer
    than ``min_per_node`` samples, it takes one random sample from the currently largest node
    (lowest node index on ties), so no node is left without data."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array, got shape {labels.shape} of dtype {labels.dtype}"
        )
    _check_counts(len(labels), n_nodes)
    if math.isnan(alpha):
        raise ValueError("alpha is NaN: the Dirichlet concentration must be a finite number > 0")
    if math.isinf(alpha):
        raise ValueError(f"alpha is {alpha}: the Dirichlet concentration must be finite and > 0")
    if alpha <= 0:
        raise ValueError(f"alpha is {alpha}: the Dirichlet concentration must be > 0")
    if min_per_node < 0 or min_per_node * n_nodes > len(labels):
        raise ValueError(
            f"min_per_node is {min_per_node}: must be >= 0, and {n_nodes} nodes x {min_per_node} "
            f"must not exceed the {len(labels)} samples"
        )

    parts: list[list[int]] = [[] for _ in range(n_nodes)]
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        shares = rng.dirichlet(np.full(n_nodes, float(alpha)))
        cuts = np.floor(np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for node, chunk in enumerate(np.split(idx, np.clip(cuts, 0, len(idx)))):
            parts[node].extend(chunk.tolist())

    sizes = [len(p) for p in parts]
    while min(sizes) < min_per_node:
        poor = int(np.argmin(sizes))
        rich = int(np.argmax(sizes))
        moved = parts[rich].pop(int(rng.integers(sizes[rich])))
        parts[poor].append(moved)
        sizes[rich] -= 1
        sizes[poor] += 1
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_shards(
    labels: np.ndarray, n_nodes: int, shards_per_node: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological label skew (McMahan et al.): sort the samples by label, cut them into
    ``n_nodes * shards_per_node`` equal shards, and deal each node ``shards_per_node`` shards at
    random, so a node sees about that many classes."""
    labels = np.asarray(labels)
    _check_counts(len(labels), n_nodes * shards_per_node)
    if shards_per_node < 1:
        raise ValueError(f"shards_per_node is {shards_per_node}: must be >= 1")
    perm = rng.permutation(len(labels))
    order = perm[np.argsort(labels[perm], kind="stable")]
    shards = np.array_split(order, n_nodes * shards_per_node)
    dealt = rng.permutation(len(shards))
    return [
        np.sort(np.concatenate([shards[j] for j in dealt[i::n_nodes]]).astype(np.int64))
        for i in range(n_nodes)
    ]


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], n_classes: int) -> np.ndarray:
    """Samples of each class on each node: shape ``(n_nodes, n_classes)``, int64."""
    labels = np.asarray(labels)
    counts = np.zeros((len(parts), n_classes), dtype=np.int64)
    for node, part in enumerate(parts):
        node_labels = labels[part]
        if node_labels.size and (node_labels.min() < 0 or node_labels.max() >= n_classes):
            raise ValueError(f"node {node} holds a label outside [0, {n_classes})")
        counts[node] = np.bincount(node_labels, minlength=n_classes)
    return counts


def _check_counts(n_samples: int, n_nodes: int) -> None:
    if n_nodes < 1:
        raise ValueError(f"n_nodes is {n_nodes}: need at least one node")
    if n_nodes > n_samples:
        raise ValueError(
            f"{n_nodes} nodes but only {n_samples} samples: each node needs at least one"
        )
