"""Reading images from disk safely: every failure is a reason string, every odd mode is
converted to 8-bit RGB (alpha composited on white, as the paper's preprocessing does)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha (RGBA, LA, PA, palette with transparency) is
    composited on white; 16/32-bit and float greyscale are rescaled to 0..255; CMYK and
    YCbCr go through PIL's conversion."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 65535.0 * 255.0
        else:  # 32-bit int or float: stretch the observed range
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        grey = Image.fromarray(np.nan_to_num(arr).round().clip(0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path: str | Path, max_pixels: int = 100_000_000) -> Tuple[Optional[Image.Image], str, str]:
    """Open and fully decode an image.

    Returns (RGB image, "", note) on success, where note names any conversion made
    (e.g. "converted from CMYK"), or (None, reason, "") when the file cannot be used.
    Never raises for a bad file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}", ""
    if size == 0:
        return None, "empty file (0 bytes)", ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    return None, f"too large: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}", ""
                im.load()
                mode = im.mode
                rgb = to_rgb(im)
                rgb.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"too large: {exc}", ""
    except UnidentifiedImageError:
        return None, "not an image (unrecognised format)", ""
    except (OSError, SyntaxError, ValueError) as exc:
        return None, f"corrupt or truncated image: {exc}", ""
    note = "" if mode == "RGB" else f"converted from {mode}"
    return rgb, "", note
