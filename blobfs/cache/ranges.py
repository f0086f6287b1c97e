"""Pure range arithmetic on half-open ``(start, end)`` byte ranges."""

from __future__ import annotations


def to_blocks(start: int, end: int, block_size: int) -> range:
    """Block numbers that cover ``[start, end)`` (empty for an empty range)."""
    if end <= start:
        return range(0)
    return range(start // block_size, (end - 1) // block_size + 1)


def runs(blocks: list[int], max_run: int) -> list[tuple[int, int]]:
    """Group sorted block numbers into runs of consecutive blocks, each at most ``max_run``.

    Returns half-open ``(first, last + 1)`` pairs, so one request can fetch each run.
    """
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][1] == b and b - out[-1][0] < max_run:
            out[-1] = (out[-1][0], b + 1)
        else:
            out.append((b, b + 1))
    return out
