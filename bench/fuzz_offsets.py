"""Bounded-time fuzzing of the untrusted-input layers: the offsets reader and the block cache.

    python bench/fuzz_offsets.py [--seconds 60]

Two hypothesis targets, each run for its share of ``--seconds`` (hypothesis has no time
budget of its own, so examples are drawn in rounds until time is up):
1. arbitrary bytes, mutations of valid offsets files, and random sequences of hostile opcode
   fragments (NEWOBJ without BUILD, huge ints, deep nesting), through ``parse_offsets``: it must
   return (members + problems) and never raise, run code, or produce an entry with a bad
   name or range;
2. random blob sizes, block sizes, budgets and read ranges through ``BlockCache`` over a
   fake transport: every read equals the slice, out-of-blob reads raise ``CorruptData``.
Prints the number of examples run and any failure (exit status 1).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobfs.cache.blocks import BlockCache, CachedBlob
from blobfs.errors import CorruptData
from blobfs.format.offsets import dumps_batch, parse_offsets
from blobfs.layout import name_problem
from blobfs.model import BlobMember

SENTINEL = Path("/tmp/blobfs-fuzz-sentinel")
COUNT = {"offsets": 0, "cache": 0}


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        pos = rng.randrange(len(buf) + 1)
        if op < 0.4 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op < 0.7:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        else:
            del buf[pos : pos + rng.randint(1, 6)]
    return bytes(buf)


def check_offsets(data: bytes) -> None:
    COUNT["offsets"] += 1
    index = parse_offsets(data, "fuzz", blob_size=1 << 20)
    for m in index.members:
        assert name_problem(m.name) is None, m
        assert 0 <= m.start <= m.end <= 1 << 20, m
    assert not SENTINEL.exists(), "a pickle ran code"


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=2000))
def fuzz_raw(data: bytes) -> None:
    check_offsets(data)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.tuples(st.text(max_size=20), st.integers(0, 1 << 21), st.integers(0, 4096)), max_size=10
    ),
    st.integers(0, 2**32),
)
def fuzz_mutated(entries: list[tuple[str, int, int]], seed: int) -> None:
    valid = dumps_batch([BlobMember(n or "x", s, s + n2) for n, s, n2 in entries])
    check_offsets(_mutate(valid, random.Random(seed)))


#: Opcode fragments that once broke the parser or could: NEWOBJ with no BUILD, a huge
#: LONG4 int (str() refuses it), deep nesting, memo references, tuples of any shape.
_CLS = b"csupervisely.api.image_api\nBlobImageInfo\n"
_FRAGMENTS = [
    _CLS + b")\x81",
    _CLS + b"q\x05",
    b"h\x05",
    b"h\x05" * 64,
    b")\x81",
    b"}(",
    b"(",
    b"u",
    b"b",
    b"e",
    b"t",
    b"](" * 300 + b"]" + b"e" * 300,
    b"X\x04\x00\x00\x00name",
    b"X\x0c\x00\x00\x00offset_start",
    b"X\n\x00\x00\x00offset_end",
    b"X\x05\x00\x00\x00a.png",
    b"J\x00\x02\x00\x00",
    b"J\xff\xff\xff\xff",
    b"\x8b\x00\x08\x00\x00" + b"\x7f" * 2048,  # LONG4: a 4,900-digit int
    b"\x88",
    b"N",
    b"G@\x80\x00\x00\x00\x00\x00\x00",
]


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=30), st.booleans())
def fuzz_fragments(parts: list[bytes], close: bool) -> None:
    body = b"".join(parts)
    check_offsets(b"\x80\x02](" + body + (b"e." if close else b""))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.integers(1, 20_000),
    st.integers(1, 3000),
    st.integers(1, 6),
    st.integers(1, 5),
    st.lists(st.tuples(st.integers(-10, 21_000), st.integers(-10, 5000)), max_size=25),
)
def fuzz_cache(size: int, block: int, budget: int, run: int, reads: list[tuple[int, int]]) -> None:
    COUNT["cache"] += 1
    data = random.Random(size).randbytes(size)

    class Reader:
        def read(self, start: int, end: int) -> bytes:
            assert 0 <= start <= end <= size
            return data[start:end]

    cache = BlockCache(block, block * budget, max_run_blocks=run)
    blob = CachedBlob("k", "v", size, Reader())
    for start, length in reads:
        end = start + length
        if start < 0 or end > size or start > end:
            try:
                cache.read(blob, start, end)
            except CorruptData:
                continue
            raise AssertionError(f"read [{start}, {end}) outside {size} did not fail")
        assert cache.read(blob, start, end) == data[start:end]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    SENTINEL.unlink(missing_ok=True)
    deadline = time.monotonic() + args.seconds
    rounds = 0
    try:
        while time.monotonic() < deadline:
            for target in (fuzz_raw, fuzz_mutated, fuzz_fragments, fuzz_cache):
                target()
            rounds += 1
    except Exception as exc:  # report the failing example hypothesis printed
        print(f"FAIL after {rounds} rounds: {type(exc).__name__}: {exc}")
        return 1
    print(
        f"{args.seconds:.0f} s, {rounds} rounds: {COUNT['offsets']} offsets inputs, "
        f"{COUNT['cache']} cache scenarios, 0 failures"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
