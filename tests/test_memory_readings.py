"""`snake-mpi memory`: the paper's 3.13 GB per node read two ways (issue 31 item 1), and the
like-for-like ratios, against the byte counts worked out by hand."""

from __future__ import annotations

import pytest

from snake_mpi.analysis.memory_accounting import (
    GIB,
    PAPER_PARAMS,
    BlockCounts,
    like_for_like,
    reading_bytes,
    readings_table,
)

# OPT-1.3B's exact blocks: embeddings, 24 decoder layers, the (tied) head
OPT = BlockCounts(
    ["embed", *[f"layer{i}" for i in range(24)], "head"],
    [107_155_456, *[50_358_272] * 24, 4_096],
    2,
)


def test_reading_b_at_24_nodes_of_one_layer_is_the_papers_figure():
    # 2 B x 1.3e9 + 14 B x 1.3e9 / 24 = 3.3583e9 B = 3.127 GiB: the paper's "3.13 GB"
    node = reading_bytes("B", PAPER_PARAMS, PAPER_PARAMS / 24)
    assert node == pytest.approx(2 * 1.3e9 + 14 * 1.3e9 / 24)
    assert round(node / GIB, 2) == 3.13
    assert round(16 * PAPER_PARAMS / node, 1) == 6.2  # and its ratio, 19.37 / 3.13
    # reading A at 6 nodes of 4 layers: 16 B x 1.3e9 x 4/24 = 3.23 GiB, 6x
    a = reading_bytes("A", PAPER_PARAMS, PAPER_PARAMS * 4 / 24)
    assert round(a / GIB, 2) == 3.23 and 16 * PAPER_PARAMS / a == pytest.approx(6.0)
    with pytest.raises(ValueError, match="unknown reading"):
        reading_bytes("C", 1, 1)


def test_like_for_like_ratios_are_the_byte_counts_divided():
    p, t = OPT.total, 50_358_272
    got = like_for_like(p, t)
    assert got["bf16 mixed"] == pytest.approx(16 * p / (2 * p + 14 * t))
    assert got["bf16 held here"] == pytest.approx((2 * p + 16 * p) / (2 * p + 16 * t))
    assert got["fp32"] == pytest.approx(16 * p / (4 * p + 12 * t))
    assert 6.2 < got["bf16 mixed"] < 6.4  # 24 x 1 layer: near the paper's 6.2x


def test_the_table_shows_both_readings_for_the_model_and_the_paper():
    text = "\n".join(readings_table(OPT))
    assert "A        6 nodes x 4 layer(s)          3.23     6.00x   6 nodes x 4 layer(s)" in text
    assert "B        24 nodes x 1 layer(s)         3.13     6.19x   24 nodes x 1 layer(s)" in text
    exact_b = (2 * OPT.total + 14 * 50_358_272) / GIB
    assert f"{exact_b:.2f}" in text.splitlines()[5]
    assert "24 nodes x 1 layer(s): bf16 mixed 6.31x" in text
