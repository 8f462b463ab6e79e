"""Anchors measured against the data: how well the configured anchors cover the training boxes,
and anchor sizes fitted to them (`model.anchors.sizes: auto`).

Both use torchvision's AnchorGenerator's base anchors on the real resized image shapes, so what
is measured is what the RPN will see.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator

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
    """For every box, the IoU of its best-matching anchor ([B]), over the anchors torchvision's
    AnchorGenerator makes for the padded image (its base anchors, grid sizes and strides).

    The anchors of one shape form a grid, and the intersection of a box with a shifted anchor
    only falls as the anchor's center moves away from the box's in x or in y: the best anchor of
    each shape is the one whose grid center is nearest the box center on each axis. Scoring that
    one per shape instead of every anchor (box_iou against ~77,000 anchors per image) made the
    `auto` fit and the coverage check of a COCO-size preflight 10 s -> 0.1 s; a test checks it
    against the brute force."""
    generator = AnchorGenerator(tuple(tuple(s) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes))
    bases = [generator.generate_anchors(sizes, aspect_ratios) for sizes, aspect_ratios
             in zip(generator.sizes, generator.aspect_ratios)]
    by_shape: dict = defaultdict(list)  # images of one size share their anchors: one pass per size
    for position, ((h, w), boxes) in enumerate(shaped_boxes):
        by_shape[(h, w)].append((position, boxes))
    best: list = [None] * len(shaped_boxes)
    for (h, w), members in by_shape.items():
        boxes = torch.cat([b for _, b in members])
        padded = (int(np.ceil(h / 32) * 32), int(np.ceil(w / 32) * 32))
        per_level = []
        for base, stride in zip(bases, strides):
            grid = (int(np.ceil(padded[0] / stride)), int(np.ceil(padded[1] / stride)))
            per_level.append(_nearest_anchor_ious(boxes, base, grid, (padded[0] // grid[0], padded[1] // grid[1])))
        ious = torch.cat(per_level, dim=1).max(dim=1).values
        for (position, _), part in zip(members, ious.split([len(b) for _, b in members])):
            best[position] = part
    return torch.cat(best) if best else torch.zeros(0)


def _nearest_anchor_ious(boxes: torch.Tensor, base: torch.Tensor, grid: tuple[int, int],
                         stride: tuple[int, int]) -> torch.Tensor:
    """[N, A]: each box's IoU with the grid copy of each base anchor centered nearest to it."""
    shifts = []
    for axis, (size, step) in enumerate(zip(grid, stride)):  # axis 0: y, 1: x
        lo, hi = (1, 3) if axis == 0 else (0, 2)
        box_center = (boxes[:, lo] + boxes[:, hi])[:, None] / 2
        anchor_center = (base[:, lo] + base[:, hi])[None] / 2
        shifts.append(torch.round((box_center - anchor_center) / step).clamp(0, size - 1) * step)
    dy, dx = shifts
    ax0, ay0, ax1, ay1 = (base[:, i][None] for i in range(4))
    iw = (torch.minimum(boxes[:, 2:3], ax1 + dx) - torch.maximum(boxes[:, 0:1], ax0 + dx)).clamp(min=0)
    ih = (torch.minimum(boxes[:, 3:4], ay1 + dy) - torch.maximum(boxes[:, 1:2], ay0 + dy)).clamp(min=0)
    inter = iw * ih
    box_area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[:, None]
    return inter / (box_area + ((ax1 - ax0) * (ay1 - ay0)) - inter)


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
