"""The preflight's word on tiling: images far larger than the detector's input whose objects
the resize shrinks below the finest stride, the problem data.tiling solves (docs/tiling.md).

Judged on the original pixels of the training boxes: after the resize of the whole image
(min_size / max_size), what share of the boxes has a short side below the finest FPN stride,
and would a tile, resized by the same rule, keep them above it.
"""

from __future__ import annotations

import numpy as np

from rcnn_trainer.data.transforms import resize_scale
from rcnn_trainer.monitor.alarms import Alarm

LARGE_FACTOR = 2.0  # images whose long side is at least this many times max_size count as large
SHRUNK_SHARE = 0.25  # the share of boxes below the stride after resize that calls for tiling


def tiling_hint(records: list, min_size: int, max_size: int, stride: int) -> Alarm | None:
    """An alarm naming data.tiling with a suggested size and overlap, or None."""
    large = [r for r in records if max(r.width, r.height) >= LARGE_FACTOR * max_size and len(r.boxes)]
    if not large or len(large) < 0.5 * sum(1 for r in records if len(r.boxes)):
        return None
    boxes = np.concatenate([r.boxes for r in large])
    scales = np.concatenate([np.full(len(r.boxes), resize_scale(r.height, r.width, min_size, max_size)) for r in large])
    short = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    long = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    shrunk = float((short * scales < stride).mean())
    if shrunk < SHRUNK_SHARE:
        return None
    # a tile of side S is resized by min_size / S: the 5% smallest boxes should span 2 strides
    q05 = max(float(np.quantile(short, 0.05)), 1.0)
    size = int(np.clip(np.floor(min_size * q05 / (2 * stride) / 32) * 32, 128, max(128, max_size)))
    overlap = float(np.clip(np.ceil(float(np.quantile(long, 0.95)) / size * 20) / 20, 0.1, 0.5))
    median = float(np.median([max(r.width, r.height) for r in large]))
    return Alarm(
        "needs_tiling", f"{len(large)} of the training images are >= {LARGE_FACTOR:g}x data.max_size={max_size} "
        f"(median long side {median:.0f} px) and {100 * shrunk:.0f}% of their boxes end thinner than the finest "
        f"stride ({stride} px) after resizing the whole image", "resized whole, the small objects shrink below "
        "what the features resolve; tiles keep them near their original size (SAHI: +5 to +7 AP on aerial data)",
        [f"data.tiling: {{size: {size}, overlap: {overlap:g}}} (training on tiles, sliced eval / predict; "
         f"data.min_size {min_size} applies to each tile)",
         "data.min_size / data.max_size: far larger instead (costs time and memory as the square)"])
