"""Layer assignment: exact against brute force over every contiguous cut, plus its errors."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from snake_mpi.assign import partition_blocks, segment_loads


def brute_force(costs: list[float], caps: list[float]) -> tuple[Fraction, list[range]]:
    """Least largest load over every way to cut ``costs`` into ``len(caps)`` non-empty runs, and
    the cut that the documented tie-break picks (squared loads, squared lengths, cut points)."""
    n_blocks, n_nodes = len(costs), len(caps)
    best = None
    for inner in itertools.combinations(range(1, n_blocks), n_nodes - 1):
        cuts = (0, *inner, n_blocks)
        spans = list(itertools.pairwise(cuts))
        loads = [
            sum((Fraction(c) for c in costs[a:b]), Fraction(0)) / Fraction(cap)
            for (a, b), cap in zip(spans, caps)
        ]
        lengths = sum(Fraction((b - a) ** 2) / Fraction(cap) for (a, b), cap in zip(spans, caps))
        key = (max(loads), sum(x * x for x in loads), lengths, inner, spans)
        best = key if best is None else min(best, key)
    assert best is not None
    return best[0], [range(a, b) for a, b in best[-1]]


def assert_valid_segments(segments: list[range], n_blocks: int, n_nodes: int) -> None:
    assert len(segments) == n_nodes
    assert all(isinstance(s, range) and s.step == 1 and len(s) > 0 for s in segments)
    assert segments[0].start == 0 and segments[-1].stop == n_blocks
    for a, b in itertools.pairwise(segments):
        assert a.stop == b.start


def random_cases(n_cases: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n_cases):
        n_blocks = int(rng.integers(1, 9))
        n_nodes = int(rng.integers(1, n_blocks + 1))
        costs = rng.integers(0, 10, n_blocks).astype(float).tolist()
        caps = rng.integers(1, 5, n_nodes).astype(float).tolist()
        yield costs, caps


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(seed: int) -> None:
    for costs, caps in random_cases(100, seed):
        segments = partition_blocks(costs, caps)
        assert_valid_segments(segments, len(costs), len(caps))
        exact = max(
            Fraction(sum(costs[b] for b in seg)) / Fraction(c) for seg, c in zip(segments, caps)
        )
        best, chosen = brute_force(costs, caps)
        assert exact == best, (costs, caps, segments)
        assert segments == chosen, (costs, caps)
        loads = segment_loads(costs, caps, segments)
        assert math.isclose(max(loads), float(exact), rel_tol=1e-12)


def test_fractional_costs_match_brute_force() -> None:
    rng = np.random.default_rng(11)
    for _ in range(50):
        n_blocks = int(rng.integers(2, 8))
        n_nodes = int(rng.integers(1, n_blocks + 1))
        costs = rng.uniform(0.0, 3.0, n_blocks).tolist()
        caps = rng.uniform(0.1, 2.0, n_nodes).tolist()
        segments = partition_blocks(costs, caps)
        assert_valid_segments(segments, n_blocks, n_nodes)
        best, chosen = brute_force(costs, caps)
        assert max(segment_loads(costs, caps, segments)) == pytest.approx(float(best), rel=1e-12)
        assert segments == chosen


def test_deterministic() -> None:
    costs, caps = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0], [1.0, 2.0, 1.5]
    assert partition_blocks(costs, caps) == partition_blocks(list(costs), tuple(caps))


@pytest.mark.parametrize("n_nodes", [1, 2, 3, 4, 6, 12])
@pytest.mark.parametrize("cost", [1.0, 0.1, 7e6, 0.0])
def test_equal_costs_and_capabilities_give_equal_lengths(n_nodes: int, cost: float) -> None:
    n_blocks = 12
    segments = partition_blocks([cost] * n_blocks, [1.0] * n_nodes)
    assert [len(s) for s in segments] == [n_blocks // n_nodes] * n_nodes


def test_uneven_equal_split_differs_by_at_most_one() -> None:
    for n_blocks in range(1, 13):
        for n_nodes in range(1, n_blocks + 1):
            lengths = [len(s) for s in partition_blocks([1.0] * n_blocks, [2.0] * n_nodes)]
            assert max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize("n_blocks", [3, 4, 6, 9, 12])
def test_stronger_node_gets_at_least_as_many_blocks(n_blocks: int) -> None:
    for caps in ([2.0, 1.0], [1.0, 2.0], [1.0, 2.0, 1.0], [2.0, 1.0, 1.0]):
        if n_blocks < len(caps):
            continue
        lengths = [len(s) for s in partition_blocks([1.0] * n_blocks, caps)]
        strong = caps.index(2.0)
        assert all(lengths[strong] >= n for n in lengths), (caps, lengths)
    assert [len(s) for s in partition_blocks([1.0] * 9, [1.0, 2.0])] == [3, 6]


def test_zero_cost_blocks_follow_capability() -> None:
    assert [len(s) for s in partition_blocks([0.0] * 6, [1.0, 2.0])] == [2, 4]


def test_accepts_numpy_numbers() -> None:
    segments = partition_blocks(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 1.0]))
    assert segments == [range(0, 3), range(3, 4)]


@pytest.mark.parametrize(
    ("costs", "caps", "message"),
    [
        ([1.0] * 4, [1.0] * 6, "4 middle blocks cannot be shared by 6 nodes: each node needs"),
        ([], [1.0], "0 middle blocks cannot be shared by 1 nodes"),
        ([1.0, 2.0], [], "no nodes"),
        ([1.0, 2.0], [1.0, 0.0], "capability of node 1 is 0.0: must be finite and > 0"),
        ([1.0, 2.0], [-1.0, 1.0], "capability of node 0 is -1.0"),
        ([1.0, 2.0], [1.0, math.inf], "capability of node 1 is inf"),
        ([1.0, 2.0], [math.nan, 1.0], "capability of node 0 is nan"),
        ([1.0, -2.0], [1.0], "cost of middle block 1 is -2.0: must be finite and >= 0"),
        ([math.nan, 2.0], [1.0], "cost of middle block 0 is nan"),
        ([1.0, math.inf], [1.0], "cost of middle block 1 is inf"),
    ],
)
def test_errors(costs: list[float], caps: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        partition_blocks(costs, caps)


def test_segment_loads() -> None:
    costs, caps = [1.0, 2.0, 3.0, 4.0], [1.0, 2.0]
    assert segment_loads(costs, caps, [range(0, 3), range(3, 4)]) == [6.0, 2.0]
    with pytest.raises(ValueError, match="1 segments given for 2 nodes"):
        segment_loads(costs, caps, [range(0, 4)])
