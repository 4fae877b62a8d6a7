"""The wire format of a block transfer (no MPI here, so analysis and tests can use it).

A transfer is an int64 header, then one contiguous uint8 payload with the blocks' bytes:

    [MAGIC, kind, round, hop, n_blocks, payload_bytes, (block_id, version, nbytes) * n_blocks]
"""

MAGIC = 0x534E414B  # "SNAK"
HEADER_FIXED = 6
HEADER_MAX_BLOCKS = 4096
KIND_MODEL = 1
KIND_SYNC = 2
KIND_NAMES = {KIND_MODEL: "model", KIND_SYNC: "final-sync"}


def header_nbytes(n_blocks: int) -> int:
    """Bytes of the header that precedes a payload of ``n_blocks`` blocks."""
    return 8 * (HEADER_FIXED + 3 * n_blocks)
