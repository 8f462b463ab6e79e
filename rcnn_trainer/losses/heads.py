"""The loss terms, each `sum / avg_factor` with the avg_factor computed right here.

avg_factor modes: "sampled" counts the sampled anchors / RoIs (torchvision and detectron2
semantics, the default); "positives" counts the sampled foreground ones (the usual choice
with focal loss). Each function returns (loss, avg_factor) so the factor can be logged.
Shapes: S sampled elements, P positives among them, C foreground classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rcnn_trainer.losses.box import BoxCoder, box_loss_per_box
from rcnn_trainer.losses.classification import class_loss_per_roi, objectness_loss_per_anchor
from rcnn_trainer.losses.reduce import avg_factor_from_count, sum_over_avg_factor
from rcnn_trainer.losses.settings import BoxLoss, ClsLoss


def _count(mode: str, num_sampled, num_positives):
    if mode == "sampled":
        return num_sampled
    if mode == "positives":
        return num_positives
    raise ValueError(f"unknown avg_factor mode '{mode}' (sampled | positives)")


def loss_rpn_cls(objectness: torch.Tensor, labels: torch.Tensor, settings: ClsLoss):
    """objectness, labels: [S] over the sampled anchors of the whole batch."""
    num_positives = (labels > 0).sum()  # a tensor: no host sync
    avg_factor = avg_factor_from_count(_count(settings.avg_factor, labels.numel(), num_positives), objectness.device)
    per_anchor = objectness_loss_per_anchor(objectness, labels, loss_type=settings.type,
                                            pos_weight=settings.pos_weight, alpha=settings.alpha, gamma=settings.gamma)
    return sum_over_avg_factor(per_anchor, avg_factor), avg_factor


def _box_term(pred_deltas, reference_boxes, gt_boxes, num_sampled, box_coder, settings: BoxLoss, wiou):
    count = _count(settings.avg_factor, num_sampled, pred_deltas.shape[0])
    avg_factor = avg_factor_from_count(count, pred_deltas.device)
    per_box = box_loss_per_box(pred_deltas, reference_boxes, gt_boxes, box_coder, loss_type=settings.type,
                               beta=settings.beta, wiou=wiou)
    return sum_over_avg_factor(per_box, avg_factor), avg_factor


def loss_rpn_box(pred_deltas: torch.Tensor, anchors: torch.Tensor, gt_boxes: torch.Tensor, num_sampled: int,
                 box_coder: BoxCoder, settings: BoxLoss, wiou=None):
    """pred_deltas, anchors, gt_boxes: [P, 4] for the positive sampled anchors. `wiou`: the
    head's WiseIoULoss module (it keeps a running mean) when settings.type is wiou."""
    return _box_term(pred_deltas, anchors, gt_boxes, num_sampled, box_coder, settings, wiou)


def loss_roi_cls(class_logits: torch.Tensor, labels: torch.Tensor, settings: ClsLoss):
    """class_logits: [S, C+1], labels: [S] in 0..C over the sampled RoIs of the batch."""
    num_positives = (labels > 0).sum()  # a tensor: no host sync
    avg_factor = avg_factor_from_count(_count(settings.avg_factor, labels.numel(), num_positives), class_logits.device)
    per_roi = class_loss_per_roi(class_logits, labels, loss_type=settings.type, pos_weight=settings.pos_weight,
                                 gamma=settings.gamma)
    return sum_over_avg_factor(per_roi, avg_factor), avg_factor


def loss_roi_box(pred_deltas: torch.Tensor, proposals: torch.Tensor, gt_boxes: torch.Tensor, num_sampled: int,
                 box_coder: BoxCoder, settings: BoxLoss, wiou=None):
    """pred_deltas (of each RoI's own gt class), proposals, gt_boxes: [P, 4] for positive RoIs."""
    return _box_term(pred_deltas, proposals, gt_boxes, num_sampled, box_coder, settings, wiou)


def loss_roi_mask(mask_logits: torch.Tensor, mask_targets: torch.Tensor):
    """mask_logits: [P, M, M], each positive RoI's logits of its own GT class; mask_targets:
    [P, M, M] in [0, 1], its GT mask cropped to the RoI and resized. Per-pixel BCE summed, divided
    by avg_factor x M x M with avg_factor = positive RoIs (averaged across ranks): the mean
    per-pixel loss of a positive, whatever the batch size or the number of objects."""
    avg_factor = avg_factor_from_count(mask_logits.shape[0], mask_logits.device)
    per_pixel = F.binary_cross_entropy_with_logits(mask_logits.float(), mask_targets.float(), reduction="none")
    pixels = mask_logits.shape[-1] * mask_logits.shape[-2]
    return sum_over_avg_factor(per_pixel, avg_factor * pixels), avg_factor
