"""How any image file becomes the RGB the model sees: one rule for training, evaluation
drawings and prediction.

Grey, palette and RGBA images go through PIL's own conversion (alpha dropped, no matte).
16-bit images (PNG, TIFF: modes I;16* and I) are scaled to 8 bits, value / 257: PIL's
convert("RGB") clips them at 255, which turned 99.6% of the pixels of a 16-bit test image
(values 0-61420) white. EXIF orientation is not applied: images are read as stored, as
pycocotools and torchvision's COCO loaders read them, so the json's width/height and boxes
refer to the stored pixels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in SIXTEEN_BIT_MODES or (img.mode == "I" and img.getextrema()[1] > 255):
        values = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def read_rgb(path: Path | str) -> Image.Image | str:
    """The image file as RGB (to_rgb), or why it cannot be read. An image over PIL's
    decompression-bomb limit (MAX_IMAGE_PIXELS, ~89 M pixels: PIL warns, and raises from twice
    that) is refused before it is decoded: a 24 KB PNG can declare 20000 x 10000 pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"the image is too large to decode safely ({err})"
    # The boundary with untrusted files: PIL's decoders answer hostile ones with OSError (a
    # truncated file, a folder, no permission), SyntaxError, ValueError, EOFError, struct.error,
    # IndexError, MemoryError...: any of them is this one file's problem, never the run's.
    except Exception as err:  # noqa: BLE001
        return f"the image could not be read ({type(err).__name__}: {err})"
