"""Image files of a COCO split: the header checked before any pixel is decoded (a missing or
unreadable file, a decompression bomb, a size other than the annotation's), at indexing for `all`
or a seeded sample of the images and again when each image is first read; an image found bad
gets the missing_image policy (records.RecordChecks.handle).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from rcnn_trainer.data.pixels import read_rgb
from rcnn_trainer.data.records import ImageRecord, RecordChecks
from rcnn_trainer.errors import UserError


def check_image_file(path: Path | str, declared: tuple[int, int] | None = None) -> str | None:
    """Why the image file cannot be used, or None. Reads the header only (cheap): a missing or
    unreadable file, a decompression bomb (PIL's limit, ~179 M pixels), or a header whose size is
    not the one the annotation file declares (a lying header would be decoded to a huge array)."""
    if not os.path.isfile(path):
        return "the image file does not exist"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                size = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"the image is too large to decode safely ({err})"
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        return f"the image file is not a readable image ({err})"
    if declared is not None and tuple(size) != tuple(declared):
        return (f"the file is {size[0]}x{size[1]} but the annotation says {declared[0]}x{declared[1]}; "
                f"fix width/height in the file")
    return None


def check_image_files(records: list[ImageRecord], check: int | str, seed: int,
                      checks: RecordChecks) -> list[ImageRecord]:
    """Read the header of `all` images or a seeded sample of `check` of them; the bad ones get
    the missing_image policy."""
    chosen = range(len(records))
    if check != "all" and check < len(records):
        chosen = sorted(np.random.default_rng(seed).choice(len(records), size=check, replace=False))
    bad = set()
    for i in chosen:
        problem = check_image_file(records[i].path, (records[i].width, records[i].height))
        if problem:
            checks.handle("missing_image", f"image id {records[i].image_id} '{records[i].path}'", problem)
            bad.add(i)
    return [r for i, r in enumerate(records) if i not in bad]


def read_first_readable(records: list[ImageRecord], index: int, checks: RecordChecks,
                        skip_unreadable: bool) -> tuple[int, Image.Image] | None:
    """(position, RGB image) of record `index`, or, when its file turns out unreadable, what the
    missing_image policy says: error raises; drop counts it and gives None (`skip_unreadable`)
    or the next readable record, searched in a loop (a long run of missing files once
    overflowed the recursion), at most once round the dataset."""
    for step in range(len(records)):
        position = (index + step) % len(records)
        record = records[position]
        # the header first (a bomb or a lying size is refused before it is decoded), then the pixels
        found = check_image_file(record.path, (record.width, record.height)) or read_rgb(record.path)
        if not isinstance(found, str):
            return position, found
        checks.handle("missing_image", f"image id {record.image_id} '{record.path}'", found)
        if skip_unreadable:
            return None
    raise UserError(f"{checks.ann_file}: none of its {len(records)} images can be read (each was dropped "
                    f"under data.bad_records.missing_image: drop; the last: image id {record.image_id} "
                    f"'{record.path}': {found}). Check the image files and the img_dir setting.")


def check_loaded_size(image: Image.Image, record: ImageRecord, ann_file: Path) -> None:
    """A decoded image must have the size the annotation file gives (its boxes are in those pixels)."""
    if image.size != (record.width, record.height):
        raise UserError(f"{ann_file}: image id {record.image_id} '{record.path}' is "
                        f"{image.size[0]}x{image.size[1]} but the annotation says "
                        f"{record.width}x{record.height}; fix width/height in the file.")
