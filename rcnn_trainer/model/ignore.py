"""Ignore regions in training targets: boxes (target key `ignore_boxes`, float xyxy [K, 4]) that
are neither foreground nor background, e.g. the part of an object that a tile border cut so
that too little of it is left to call it one (data/tiling.py).

The rule is the matchers' own: an anchor or RoI that would have been a negative (label 0) but
overlaps an ignore box with IoU >= the matcher's background threshold (what would have kept it
out of the negatives had the box been ground truth) gets label -1, which torchvision's
BalancedPositiveNegativeSampler and our OHEM never sample. Positives stay positives.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_iou


def ignore_overlapping(labels: torch.Tensor, candidates: torch.Tensor, ignore_boxes: torch.Tensor | None,
                       bg_iou_thresh: float) -> torch.Tensor:
    """`labels` [A] (1.. fg, 0 bg, -1 ignored) of `candidates` [A, 4] with the negatives whose IoU
    with any of `ignore_boxes` [K, 4] reaches `bg_iou_thresh` set to -1 (a new tensor; the
    same one when there is nothing to ignore)."""
    if ignore_boxes is None or not len(ignore_boxes) or not len(candidates):
        return labels
    iou = box_iou(candidates, ignore_boxes.to(candidates.dtype)).amax(dim=1)
    return torch.where((labels == 0) & (iou >= bg_iou_thresh), torch.full_like(labels, -1), labels)
