"""Layer assignment: cut the middle blocks into one contiguous segment per node, by capability.

Pure (no torch, no MPI) so that it can be tested exhaustively. Arithmetic is exact
(``fractions.Fraction`` of the given floats), so ties are real ties and the answer does not
depend on the order in which floating-point sums are taken.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

_Key = tuple[Fraction, Fraction, tuple[int, ...]]
"""Tie-break key of a partial cut: sum of squared loads, sum of squared lengths / capability,
cut points."""


def partition_blocks(costs: Sequence[float], capabilities: Sequence[float]) -> list[range]:
    """Segment ``i`` (a range of middle-block positions) for node ``i``: contiguous, non-empty,
    in node order, minimising the largest load ``sum(costs[segment_i]) / capabilities[i]``.

    Among cuts with that least largest load, the one chosen has (1) the least sum of squared
    loads, then (2) the least ``sum(len(segment_i) ** 2 / capabilities[i])`` (zero-cost blocks
    still go by capability), then (3) the lexicographically smallest tuple of cut points. So
    equal costs and equal capabilities with ``len(costs)`` divisible by the number of nodes give
    equal segment lengths. Exact dynamic programme over nodes x blocks, O(N * L**2).
    """
    cost, cap = _validated(costs, capabilities)
    n_blocks, n_nodes = len(cost), len(cap)
    prefix = [Fraction(0)]
    for c in cost:
        prefix.append(prefix[-1] + c)

    def load(node: int, start: int, stop: int) -> Fraction:
        return (prefix[stop] - prefix[start]) / cap[node]

    def starts(k: int, j: int) -> range:
        """Where node ``k``'s segment ending at ``j`` may start: a block for each earlier node."""
        return range(k, j)

    def stops(k: int) -> range:
        """Where node ``k``'s segment may end: a block left for each later node."""
        return range(k + 1, n_blocks - (n_nodes - 1 - k) + 1)

    # Phase 1: the least achievable largest load.
    worst: list[dict[int, Fraction]] = [{j: load(0, 0, j) for j in stops(0)}]
    for k in range(1, n_nodes):
        worst.append(
            {j: min(max(worst[k - 1][i], load(k, i, j)) for i in starts(k, j)) for j in stops(k)}
        )
    bound = worst[-1][n_blocks]

    # Phase 2: among cuts whose every load is within the bound, the tie-break order above.
    # best[k][j]: key of the best cut of blocks [0, j) over nodes 0..k (absent if none fits).
    best: list[dict[int, _Key]] = [
        {j: (load(0, 0, j) ** 2, j * j / cap[0], ()) for j in stops(0) if load(0, 0, j) <= bound}
    ]
    for k in range(1, n_nodes):
        row: dict[int, _Key] = {}
        for j in stops(k):
            options = []
            for i in starts(k, j):
                prev = best[k - 1].get(i)
                seg = load(k, i, j)
                if prev is None or seg > bound:
                    continue
                options.append((prev[0] + seg**2, prev[1] + (j - i) ** 2 / cap[k], (*prev[2], i)))
            if options:
                row[j] = min(options)
        best.append(row)
    cuts = (0, *best[-1][n_blocks][2], n_blocks)
    return [range(cuts[i], cuts[i + 1]) for i in range(n_nodes)]


def segment_loads(
    costs: Sequence[float], capabilities: Sequence[float], segments: Sequence[range]
) -> list[float]:
    """Per-node load ``sum(costs[segment_i]) / capabilities[i]`` (exactly summed, then rounded)."""
    cost, cap = _validated(costs, capabilities, check_count=False)
    if len(segments) != len(cap):
        raise ValueError(f"{len(segments)} segments given for {len(cap)} nodes")
    return [float(sum((cost[b] for b in seg), Fraction(0)) / c) for seg, c in zip(segments, cap)]


def _validated(
    costs: Sequence[float], capabilities: Sequence[float], *, check_count: bool = True
) -> tuple[list[Fraction], list[Fraction]]:
    """Costs and capabilities as exact fractions, or a ValueError naming the offending number."""
    n_blocks, n_nodes = len(costs), len(capabilities)
    if n_nodes == 0:
        raise ValueError("no nodes to share the middle blocks: capabilities is empty")
    if check_count and n_blocks < n_nodes:
        raise ValueError(
            f"{n_blocks} middle blocks cannot be shared by {n_nodes} nodes: "
            "each node needs at least one"
        )
    for i, c in enumerate(costs):
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"cost of middle block {i} is {c}: must be finite and >= 0")
    for i, c in enumerate(capabilities):
        if not math.isfinite(c) or c <= 0:
            raise ValueError(f"capability of node {i} is {c}: must be finite and > 0")
    return [Fraction(float(c)) for c in costs], [Fraction(float(c)) for c in capabilities]
