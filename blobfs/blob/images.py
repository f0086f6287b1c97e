"""Image dimensions for annotations: the only reason blobfs needs Pillow."""

from __future__ import annotations

from typing import IO

from blobfs.errors import InvalidInput


def image_size(stream: IO[bytes], name: str) -> tuple[int, int]:
    """Return (width, height) from the image header without decoding pixels.

    Raises:
        InvalidInput: the bytes are not an image Pillow can identify.
    """
    from PIL import Image, UnidentifiedImageError  # lazy: the mount itself never needs it

    try:
        with Image.open(stream) as img:
            return int(img.width), int(img.height)
    except UnidentifiedImageError as exc:
        # Pillow's own message names the Python stream object, which tells a user nothing
        raise InvalidInput(f"{name}: not an image (format unknown to Pillow)") from exc
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{name}: not an image ({exc})") from exc
