"""Generated sample images for the demo, tests and benchmarks.

Images are small PNGs of seeded noise, so every file differs (no accidental dedup) and a
test can regenerate the exact bytes from the seed. ``make demo`` runs this module
(``python -m tests.support.sample DIR``) in a venv with blobfs's runtime dependencies only,
so it imports nothing beyond them.
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import click


def png_bytes(seed: int, width: int = 32, height: int = 32) -> bytes:
    """A valid RGB PNG of noise (about 3 KB at 32x32), built with zlib only."""
    rng = random.Random(seed)
    rows = b"".join(b"\0" + rng.randbytes(width * 3) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\0\0\0"
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 1))
        + chunk(b"IEND", b"")
    )


def make_images(
    folder: Path, count: int, width: int = 32, height: int = 32, start_seed: int = 0
) -> list[Path]:
    """Write ``count`` PNGs named ``img_000000.png``... into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{start_seed + i:06d}.png"
        path.write_bytes(png_bytes(start_seed + i, width, height))
        paths.append(path)
    return paths


@click.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--count", default=100, show_default=True)
@click.option("--size", default=32, show_default=True, help="Width and height in pixels.")
def main(folder: str, count: int, size: int) -> None:
    """Write COUNT generated PNG images into FOLDER."""
    make_images(Path(folder), count, size, size)
    click.echo(f"wrote {count} images to {folder}")


if __name__ == "__main__":
    main()
