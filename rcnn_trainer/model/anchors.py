"""Anchors measured against the data: how well the configured anchors cover the training boxes,
and anchor sizes fitted to them (`model.anchors.sizes: auto`).

Both use torchvision's AnchorGenerator on the real resized image shapes, so what is measured is
what the RPN will see.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from rcnn_trainer.data.transforms import resize_scale


def fpn_strides(backbone_name: str) -> list[int]:
    """Strides of the FPN levels the anchors live on (see model/backbone.py)."""
    return [16, 32, 64] if backbone_name.startswith("mobilenet") else [4, 8, 16, 32, 64]


def sample_records(records: list, max_images: int, seed: int) -> list:
    """Records with objects, at most max_images of them (a seeded sample)."""
    with_objects = [r for r in records if len(r.labels)]
    if len(with_objects) <= max_images:
        return with_objects
    rng = np.random.default_rng(seed)
    return [with_objects[i] for i in sorted(rng.choice(len(with_objects), max_images, replace=False))]


def resized_boxes(records: list, min_size: int, max_size: int) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """(resized image (h, w), boxes after resize) per record."""
    out = []
    for r in records:
        scale = resize_scale(r.height, r.width, min_size, max_size)
        out.append(((round(r.height * scale), round(r.width * scale)), torch.from_numpy(r.boxes).float() * scale))
    return out


def best_anchor_ious(shaped_boxes, anchor_sizes, aspect_ratios, strides) -> torch.Tensor:
    """For every box, the IoU of its best-matching anchor ([B])."""
    generator = AnchorGenerator(tuple(tuple(s) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes))
    anchors_by_shape: dict = {}
    best = []
    for (h, w), boxes in shaped_boxes:
        if (h, w) not in anchors_by_shape:
            padded = (int(np.ceil(h / 32) * 32), int(np.ceil(w / 32) * 32))
            feats = [torch.empty(1, 1, int(np.ceil(padded[0] / s)), int(np.ceil(padded[1] / s))) for s in strides]
            anchors_by_shape[(h, w)] = generator(ImageList(torch.empty(1, 3, *padded), [(h, w)]), feats)[0]
        best.append(box_iou(boxes, anchors_by_shape[(h, w)]).max(dim=1).values)
    return torch.cat(best) if best else torch.zeros(0)


def box_sides(shaped_boxes) -> torch.Tensor:
    """sqrt(area) of every box after resize."""
    sides = [((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).clamp(min=0).sqrt() for _, b in shaped_boxes]
    return torch.cat(sides) if sides else torch.zeros(0)


def octave_sizes(base: float, levels: int) -> list[list[float]]:
    """One anchor size per FPN level, doubling with the stride (the FPN paper's layout)."""
    return [[round(base * 2 ** level, 1)] for level in range(levels)]


def fit_anchor_sizes(records: list, *, levels: int, aspect_ratios: list[float], strides: list[int], min_size: int,
                     max_size: int, fg_iou_thresh: float, max_images: int = 300,
                     seed: int = 0) -> tuple[list[list[float]], dict]:
    """Octave-spaced sizes whose smallest anchor is chosen, on a grid of quarter octaves around
    the 10th percentile of the box sides, to give the most boxes an anchor with IoU >= 0.5
    (ties: the most boxes above fg_iou_thresh). Returns the sizes and what they reach."""
    shaped = resized_boxes(sample_records(records, max_images, seed), min_size, max_size)
    sides = box_sides(shaped)
    if not len(sides):
        raise ValueError("no boxes to fit anchors to")
    p10 = float(np.quantile(sides.numpy(), 0.1))
    best_score, best = None, None
    for step in range(-4, 5):
        base = max(2.0, p10 * 2 ** (step / 4))
        sizes = octave_sizes(base, levels)
        ious = best_anchor_ious(shaped, sizes, aspect_ratios, strides)
        score = (float((ious >= 0.5).float().mean()), float((ious >= fg_iou_thresh).float().mean()))
        if best_score is None or score > best_score:
            best_score, best = score, sizes
    return best, {"above_0.5": best_score[0], "above_fg": best_score[1], "boxes": int(len(sides)),
                  "median_side": float(sides.median())}
