"""The four loss terms, each `sum / avg_factor` with the avg_factor computed right here.

avg_factor modes: "sampled" counts the sampled anchors / RoIs (torchvision and detectron2
semantics, the default); "positives" counts the sampled foreground ones (the usual choice
with focal loss). Each function returns (loss, avg_factor) so the factor can be logged.
Shapes: S sampled elements, P positives among them, C foreground classes.
"""

from __future__ import annotations

import torch
from torchvision.models.detection._utils import BoxCoder

from rcnn_trainer.losses.box import box_loss_per_box
from rcnn_trainer.losses.classification import class_loss_per_roi, objectness_loss_per_anchor
from rcnn_trainer.losses.reduce import avg_factor_from_count, sum_over_avg_factor


def _count(mode: str, num_sampled, num_positives):
    if mode == "sampled":
        return num_sampled
    if mode == "positives":
        return num_positives
    raise ValueError(f"unknown avg_factor mode '{mode}' (sampled | positives)")


def loss_rpn_cls(objectness: torch.Tensor, labels: torch.Tensor, *, loss_type: str, pos_weight: float,
                 alpha: float, gamma: float, avg_factor_mode: str):
    """objectness, labels: [S] over the sampled anchors of the whole batch."""
    num_positives = (labels > 0).sum()  # a tensor: no host sync
    avg_factor = avg_factor_from_count(_count(avg_factor_mode, labels.numel(), num_positives), objectness.device)
    per_anchor = objectness_loss_per_anchor(objectness, labels, loss_type=loss_type, pos_weight=pos_weight,
                                            alpha=alpha, gamma=gamma)
    return sum_over_avg_factor(per_anchor, avg_factor), avg_factor


def _box_term(pred_deltas, reference_boxes, gt_boxes, num_sampled, box_coder, loss_type, beta, avg_factor_mode, wiou):
    count = _count(avg_factor_mode, num_sampled, pred_deltas.shape[0])
    avg_factor = avg_factor_from_count(count, pred_deltas.device)
    per_box = box_loss_per_box(pred_deltas, reference_boxes, gt_boxes, box_coder, loss_type=loss_type, beta=beta,
                               wiou=wiou)
    return sum_over_avg_factor(per_box, avg_factor), avg_factor


def loss_rpn_box(pred_deltas: torch.Tensor, anchors: torch.Tensor, gt_boxes: torch.Tensor, num_sampled: int,
                 box_coder: BoxCoder, *, loss_type: str, beta: float, avg_factor_mode: str, wiou=None):
    """pred_deltas, anchors, gt_boxes: [P, 4] for the positive sampled anchors."""
    return _box_term(pred_deltas, anchors, gt_boxes, num_sampled, box_coder, loss_type, beta, avg_factor_mode, wiou)


def loss_roi_cls(class_logits: torch.Tensor, labels: torch.Tensor, *, loss_type: str, pos_weight: float,
                 gamma: float, avg_factor_mode: str):
    """class_logits: [S, C+1], labels: [S] in 0..C over the sampled RoIs of the batch."""
    num_positives = (labels > 0).sum()  # a tensor: no host sync
    avg_factor = avg_factor_from_count(_count(avg_factor_mode, labels.numel(), num_positives), class_logits.device)
    per_roi = class_loss_per_roi(class_logits, labels, loss_type=loss_type, pos_weight=pos_weight, gamma=gamma)
    return sum_over_avg_factor(per_roi, avg_factor), avg_factor


def loss_roi_box(pred_deltas: torch.Tensor, proposals: torch.Tensor, gt_boxes: torch.Tensor, num_sampled: int,
                 box_coder: BoxCoder, *, loss_type: str, beta: float, avg_factor_mode: str, wiou=None):
    """pred_deltas (of each RoI's own gt class), proposals, gt_boxes: [P, 4] for positive RoIs."""
    return _box_term(pred_deltas, proposals, gt_boxes, num_sampled, box_coder, loss_type, beta, avg_factor_mode, wiou)
