"""Tiles of large images: the grid of overlapping windows, and ground truth cut to a window.

A window is (x0, y0, x1, y1) in original image pixels, integer, x1 - x0 <= size. The grid is
the same for training (data/tiled_dataset.py) and sliced inference (infer/sliced.py), so a
model sees at inference the views it was trained on.

Cutting a box to a window keeps it as ground truth when at least `min_visible` of its area is
inside; a box less visible than that (an object mostly in the neighbouring tile) is neither a
positive nor a negative there: its visible part becomes an ignore box (the target key
`ignore_boxes`, read by model/ignore.py), so that the RPN and the RoI head are not taught that a
recognisable piece of an object is background.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

IGNORE_KEY = "ignore_boxes"  # target key: float32 [K, 4] xyxy regions that are neither fg nor bg


def axis_starts(length: int, size: int, overlap: float) -> list[int]:
    """Start offsets of the tiles along one side: evenly spread, the first at 0 and the last
    ending at `length`, neighbours sharing at least overlap x size pixels."""
    if length <= size:
        return [0]
    stride = max(1, int(size * (1.0 - overlap)))
    count = math.ceil((length - size) / stride) + 1
    return [round(i * (length - size) / (count - 1)) for i in range(count)]


def tile_grid(height: int, width: int, size: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """Windows (x0, y0, x1, y1) covering a height x width image, row by row; an image with both
    sides <= size is one window, the whole image."""
    return [(x0, y0, min(x0 + size, width), min(y0 + size, height))
            for y0 in axis_starts(height, size, overlap) for x0 in axis_starts(width, size, overlap)]


def is_tiled(height: int, width: int, size: int) -> bool:
    """Whether an image of this size is cut into tiles (else it is used whole)."""
    return max(height, width) > size


def cut_boxes(boxes: np.ndarray, window: tuple[int, int, int, int],
              min_visible: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes [N, 4] xyxy (image pixels) cut to `window`: (indices of the boxes kept as ground
    truth, their boxes clipped and in window pixels [K, 4], ignore boxes in window pixels [I, 4]).
    Visible fraction = clipped area / area; >= min_visible: kept, (0, min_visible): ignore."""
    x0, y0, x1, y1 = window
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    clipped = np.stack([boxes[:, 0].clip(x0, x1), boxes[:, 1].clip(y0, y1),
                        boxes[:, 2].clip(x0, x1), boxes[:, 3].clip(y0, y1)], axis=1)
    visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    fraction = np.where(area > 0, visible / np.maximum(area, 1e-9), 0.0)
    shifted = clipped - np.array([x0, y0, x0, y0], np.float32)
    kept = np.where((fraction >= min_visible) & (visible > 0))[0]
    ignored = np.where((fraction < min_visible) & (visible > 0))[0]
    return kept, shifted[kept], shifted[ignored]


def tile_masks(segmentations: list, height: int, width: int, window: tuple[int, int, int, int],
               size: tuple[int, int]) -> np.ndarray:
    """uint8 [N, h, w] masks of the segmentations (COCO polygons or RLE of the height x width
    image) inside `window`, at `size` = (h, w): polygons are shifted and scaled, then rasterized
    at the tile's output size (pycocotools clips them to it); an RLE is decoded one object at a
    time and cropped. Never N full-size masks at once."""
    from pycocotools import mask as mask_utils

    from rcnn_trainer.data.masks import to_rle

    x0, y0, x1, y1 = window
    h, w = size
    scale = np.array([w / (x1 - x0), h / (y1 - y0)])
    masks = np.zeros((len(segmentations), h, w), dtype=np.uint8)
    for i, segmentation in enumerate(segmentations):
        if isinstance(segmentation, list):
            moved = [((np.asarray(p, np.float64).reshape(-1, 2) - (x0, y0)) * scale).ravel().tolist()
                     for p in segmentation]
            masks[i] = mask_utils.decode(to_rle(moved, h, w))
        else:
            crop = mask_utils.decode(to_rle(segmentation, height, width))[y0:y1, x0:x1]
            masks[i] = np.asarray(Image.fromarray(crop).resize((w, h), Image.NEAREST))
    return masks


def split_ignored(target: dict, ignore_label: int) -> dict:
    """After the transforms: the boxes labelled `ignore_label` (cut boxes carried through the
    same geometric transforms as the real ones) move to target[IGNORE_KEY]."""
    ignore = target["labels"] == ignore_label
    if not bool(ignore.any()):
        return dict(target, **{IGNORE_KEY: target["boxes"].new_zeros((0, 4))})
    keep = ~ignore
    out = dict(target, boxes=target["boxes"][keep], labels=target["labels"][keep],
               **{IGNORE_KEY: target["boxes"][ignore]})
    if "masks" in target:
        out["masks"] = target["masks"][keep]
    return out


def allow_large_images(max_megapixels: float) -> None:
    """Raise PIL's decompression-bomb limit (~89 M pixels by default) to `max_megapixels`, for
    tiling: images far beyond the detector's input are what it is for. Our readers turn PIL's
    warning into a refusal, so the limit stays a hard one, only higher. Never lowers a limit."""
    limit = int(max_megapixels * 1e6)
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit


def window_tensor(image: torch.Tensor, window: tuple[int, int, int, int]) -> torch.Tensor:
    """A view (no copy) of the window of an image tensor [C, H, W]."""
    x0, y0, x1, y1 = window
    return image[:, y0:y1, x0:x1]
