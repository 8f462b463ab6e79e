"""Annotations that a trained model disagrees with, most suspicious first.

From the model's detections (score >= `min_score`) against the annotations of each image:
- `overlooked`: a detection that no annotation of any class touches (IoU < 0.1) and that no
  badly located annotation explains: an object with no annotation. Score: the detection's.
  (At 0.3 instead of 0.1, duplicate and partial detections next to annotated objects filled the
  top of the list: precision at N 0.63 instead of 0.73 on planted errors, seed 0 of
  tools/label_issue_bench.py; docs/benchmarks.md reports other seeds.)
  Detections of several classes on one spot count once (the most confident).
- `swapped`: an annotation that a detection of another class covers (IoU >= 0.5) more
  confidently than any detection of its own class does; `category_id` is the class the model
  sees. Score: other-class score x (1 - own-class score).
- `badly_located`: an annotation with no confident detection of its class at IoU >= 0.5 but one
  at IoU 0.1-0.5 that covers no other annotation: the box is off its object (`model_bbox` is
  where the model puts it). Score: detection score x (1 - IoU).
- `spurious`: an annotation no detection of any class touches (IoU >= 0.1, score >= 0.1): nothing
  the model recognizes is there. Score: 0.5 x (1 - the best overlapping score): halved, because
  an object the model merely fails to find looks the same; it ranks below the confident kinds.
The scores are the model's confidence in each disagreement, not probabilities of a label error.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_convert, nms

from rcnn_trainer.analysis.confusion import ImageDetections

UNCOVERED = 0.1      # an overlooked detection overlaps no annotation more than this
WELL_PLACED = 0.5    # a detection at this IoU covers an annotation
TOUCHING = 0.1       # below this a detection has nothing to do with an annotation
SPURIOUS_FACTOR = 0.5


def _xywh(box: torch.Tensor) -> list[float]:
    return [round(float(v), 2) for v in box_convert(box[None].float(), "xyxy", "xywh")[0]]


def find_label_issues(images: list[ImageDetections], label_to_cat: dict[int, int], min_score: float = 0.3) -> list[dict]:
    issues: list[dict] = []
    for image in images:
        issues += _image_issues(image, label_to_cat, min_score)
    return sorted(issues, key=lambda issue: -issue["score"])


def _image_issues(image: ImageDetections, label_to_cat: dict[int, int], min_score: float) -> list[dict]:
    iou = image.iou()  # [D, G]
    scores, labels = image.scores.float(), image.labels
    confident = scores >= min_score
    found, explained = [], set()

    def issue(kind: str, score: float, **fields) -> dict:
        return {"image_id": image.image_id, "file_name": image.file_name, "kind": kind, "score": round(score, 4),
                **fields}

    for g in range(len(image.gt_boxes)):
        gt_label = int(image.gt_labels[g])
        column = iou[:, g] if len(scores) else torch.zeros(0)
        same = labels == gt_label
        own = scores[same & (column >= WELL_PLACED)]
        own_best = float(own.max()) if len(own) else 0.0
        annotated = dict(annotation_id=image.gt_ids[g], bbox=_xywh(image.gt_boxes[g]))
        other = (~same) & confident & (column >= WELL_PLACED)
        if other.any():
            d = int(torch.where(other, scores, torch.tensor(-1.0)).argmax())
            if float(scores[d]) > own_best:
                found.append(issue("swapped", float(scores[d]) * (1 - own_best), category_id=label_to_cat[int(labels[d])],
                                   annotated_category_id=label_to_cat[gt_label], **annotated))
                explained.add(d)
                continue
        if own_best < min_score:
            # a confident detection of its class near it, which covers no other annotation
            near = same & confident & (column >= TOUCHING) & (column < WELL_PLACED)
            if len(image.gt_boxes) > 1:
                others = torch.cat([iou[:, :g], iou[:, g + 1:]], dim=1)
                near &= others.max(1).values < WELL_PLACED
            if near.any():
                d = int(torch.where(near, scores, torch.tensor(-1.0)).argmax())
                found.append(issue("badly_located", float(scores[d]) * (1 - float(column[d])),
                                   category_id=label_to_cat[gt_label], model_bbox=_xywh(image.boxes[d]), **annotated))
                explained.add(d)
                continue
        touching = (column >= TOUCHING) & (scores >= 0.1)
        if not touching.any():
            best = float(scores[column >= TOUCHING].max()) if (column >= TOUCHING).any() else 0.0
            found.append(issue("spurious", SPURIOUS_FACTOR * (1 - best), category_id=label_to_cat[gt_label], **annotated))
    uncovered = confident & ((iou.max(1).values < UNCOVERED) if iou.shape[1] else torch.ones_like(confident))
    uncovered &= ~image.in_crowd(0.5)  # a crowd region is annotated: not an overlooked object
    candidates = [d for d in torch.where(uncovered)[0].tolist() if d not in explained]
    if candidates:
        kept = nms(image.boxes[candidates].float(), scores[candidates], WELL_PLACED)  # one per spot, any class
        for k in kept.tolist():
            d = candidates[k]
            found.append(issue("overlooked", float(scores[d]), annotation_id=None, bbox=_xywh(image.boxes[d]),
                               category_id=label_to_cat[int(labels[d])]))
    return found
