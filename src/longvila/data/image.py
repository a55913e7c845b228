"""Load images from paths as uint8 RGB arrays, the way cameras meant them to be seen."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from longvila.data.errors import ImageDecodeError


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 (H, W, 3) RGB, rotated/flipped as its EXIF orientation tag says.

    Raises FileNotFoundError for a missing file and ImageDecodeError (a ValueError) naming the file
    when it is not an image or cannot be decoded.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    if os.path.isdir(path):
        raise ImageDecodeError(f"{path}: is a directory, not an image file")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # PIL reports damaged files as OSError ("truncated"), SyntaxError (bad PNG) or ValueError.
        raise ImageDecodeError(f"{path}: cannot be read as an image ({exc})") from exc
