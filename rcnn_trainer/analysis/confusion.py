"""Per-image pairing of detections with ground truth, and the confusion matrix built on it.

Detections at or above a score are taken highest first; each pairs with the unpaired GT box of
any class it overlaps most, at IoU >= `iou`. Rows of the matrix are the GT class, columns the
detected class; index 0 is background: row 0 counts detections that paired with no GT (false
positives), column 0 GT boxes no detection paired with (missed). Rows 1.. sum to the GT count,
columns 1.. to the detection count. An unpaired detection inside a crowd region (iscrowd=1:
intersection over the detection's area >= `iou`, COCO's rule) is neither, as in COCO's
evaluation: it is left out of the matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_convert, box_iou


@dataclass
class ImageDetections:
    """One image's ground truth (non-crowd, original pixels, labels 1..C) and detections."""
    image_id: int | str        # as in the annotation file
    file_name: str
    gt_boxes: torch.Tensor     # [G, 4] xyxy
    gt_labels: torch.Tensor    # [G]
    gt_ids: list[int]          # annotation ids
    boxes: torch.Tensor        # [D, 4] xyxy
    labels: torch.Tensor       # [D]
    scores: torch.Tensor       # [D]
    crowd_boxes: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 4)))  # [K, 4] xyxy, iscrowd=1

    def iou(self) -> torch.Tensor:
        """[D, G]"""
        if not len(self.boxes) or not len(self.gt_boxes):
            return torch.zeros(len(self.boxes), len(self.gt_boxes))
        return box_iou(self.boxes.float(), self.gt_boxes.float())

    def in_crowd(self, iou: float) -> torch.Tensor:
        """[D] bool: the detection lies in a crowd region (pycocotools' crowd IoU: intersection
        over the detection's area, >= `iou`)."""
        if not len(self.boxes) or not len(self.crowd_boxes):
            return torch.zeros(len(self.boxes), dtype=torch.bool)
        dets, crowd = (box_convert(b.double(), "xyxy", "xywh").numpy() for b in (self.boxes, self.crowd_boxes))
        overlap = mask_utils.iou(dets, crowd, [1] * len(crowd))
        return torch.from_numpy(np.asarray(overlap).max(axis=1) >= iou)


def pair_detections(image: ImageDetections, score: float, iou: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """(pairs (det, gt), unpaired detections, unpaired GT) for detections with score >= `score`;
    unpaired detections in a crowd region are in neither list."""
    overlaps = image.iou()
    in_crowd = image.in_crowd(iou)
    order = [int(i) for i in torch.argsort(image.scores, descending=True) if float(image.scores[i]) >= score]
    free = set(range(len(image.gt_boxes)))
    pairs, lonely = [], []
    for d in order:
        candidates = [(float(overlaps[d, g]), g) for g in free if float(overlaps[d, g]) >= iou]
        if candidates:
            _, g = max(candidates)
            free.discard(g)
            pairs.append((d, g))
        elif not in_crowd[d]:
            lonely.append(d)
    return pairs, lonely, sorted(free)


def confusion_matrix(images: list[ImageDetections], num_classes: int, score: float = 0.3,
                     iou: float = 0.5) -> np.ndarray:
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for image in images:
        pairs, lonely, missed = pair_detections(image, score, iou)
        for d, g in pairs:
            matrix[int(image.gt_labels[g]), int(image.labels[d])] += 1
        for d in lonely:
            matrix[0, int(image.labels[d])] += 1
        for g in missed:
            matrix[int(image.gt_labels[g]), 0] += 1
    return matrix
