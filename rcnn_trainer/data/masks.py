"""Instance masks from COCO `segmentation` (polygons, uncompressed or compressed RLE) through
pycocotools' mask API, as COCO's own annToRLE reads them.

Masks are rasterized per image when it is loaded (never held for the whole dataset: a COCO-size
file would need hundreds of GB), at the size the transforms resize the image to (never at the
full size: 100 objects on a 4000 x 4000 image would be 1.6 GB); the transforms flip them with it.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def segmentation_problem(segmentation, height: int, width: int) -> str | None:
    """Why this segmentation cannot give a mask for an image of this size, or None."""
    if isinstance(segmentation, list):
        if not segmentation:
            return "the segmentation is an empty list"
        for polygon in segmentation:
            if type(polygon) is not list or not all(type(v) in (int, float) for v in polygon) \
                    or not all(map(math.isfinite, polygon)):
                return f"a polygon must be a list of finite numbers [x1, y1, x2, y2, ...], got {polygon!r:.80}"
            if len(polygon) < 6 or len(polygon) % 2:
                return f"a polygon needs at least 3 points (6 numbers, an even count), got {len(polygon)} numbers"
    elif isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if size != [height, width]:
            return f"the RLE's size {size!r:.40} is not the image's [height, width] = [{height}, {width}]"
        if not isinstance(counts, (str, list)) or (isinstance(counts, list) and not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)):
            return "the RLE's counts must be a COCO string or a list of non-negative integers"
        if isinstance(counts, list) and sum(counts) != height * width:
            return f"the uncompressed RLE covers {sum(counts)} pixels, the image has {height * width}"
    else:
        return f"the segmentation must be polygons (a list) or an RLE (a dict), got {type(segmentation).__name__}"
    if isinstance(segmentation, list) and sum(map(_shoelace, segmentation)) >= 1.0:
        return None  # at least a pixel's area: not empty (pycocotools' rasterization would cost 8x the check)
    try:
        if not mask_area(segmentation, height, width):
            return "the mask is empty (no pixel inside)"
    except (ValueError, TypeError, KeyError, UnicodeError) as err:
        return f"pycocotools cannot read it ({err})"
    return None


def _shoelace(polygon: list) -> float:
    xs, ys = polygon[0::2], polygon[1::2]
    return abs(sum(x0 * y1 - x1 * y0 for x0, y0, x1, y1 in zip(xs, ys, xs[1:] + xs[:1], ys[1:] + ys[:1]))) / 2


def to_rle(segmentation, height: int, width: int) -> dict:
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": segmentation["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def mask_area(segmentation, height: int, width: int) -> int:
    from pycocotools import mask as mask_utils

    return int(mask_utils.area(to_rle(segmentation, height, width)))


def rasterize(segmentations: list, height: int, width: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [N, h, w] masks (0 / 1) of the segmentations of a `height` x `width` image, at
    `size` = (h, w) (default: the image's). Polygons are scaled to (h, w) and rasterized there;
    an RLE (stored at the image's size) is decoded and resized one object at a time, nearest
    neighbour as the Resize transform resizes masks. Memory: the N x h x w result plus one
    full-size mask."""
    from pycocotools import mask as mask_utils

    from rcnn_trainer.data.transforms import resize_masks

    h, w = size if size is not None else (height, width)
    masks = np.zeros((len(segmentations), h, w), dtype=np.uint8)
    scale = np.array([w / width, h / height])
    for i, segmentation in enumerate(segmentations):
        if (h, w) == (height, width):
            masks[i] = mask_utils.decode(to_rle(segmentation, height, width))
        elif isinstance(segmentation, list):  # x, y pairs scaled like the image's pixels
            scaled = [(np.asarray(polygon, np.float64).reshape(-1, 2) * scale).ravel().tolist()
                      for polygon in segmentation]
            masks[i] = mask_utils.decode(to_rle(scaled, h, w))
        else:
            full = torch.from_numpy(mask_utils.decode(to_rle(segmentation, height, width)))
            masks[i] = resize_masks(full[None], h, w)[0].numpy()
    return masks
