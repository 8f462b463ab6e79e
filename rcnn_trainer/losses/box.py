"""Per-box regression losses (no reduction: the caller divides by avg_factor).

smooth_l1 and l1 compare encoded deltas; giou / diou / ciou / wiou decode the predicted deltas
against the reference boxes (anchors or proposals) and compare boxes, using torchvision.ops.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from rcnn_trainer.losses.wise_iou import WiseIoULoss


class BoxCoder(Protocol):
    """The heads' box coder (torchvision's, reached through the RPN and RoI heads it builds):
    what the losses call on it, named here so no private torchvision module is imported."""

    def encode_single(self, reference_boxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor: ...

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor: ...


IOU_LOSSES = {
    "giou": generalized_box_iou_loss,
    "diou": distance_box_iou_loss,
    "ciou": complete_box_iou_loss,
}


def box_loss_per_box(pred_deltas: torch.Tensor, reference_boxes: torch.Tensor, gt_boxes: torch.Tensor,
                     box_coder: BoxCoder, *, loss_type: str, beta: float = 1.0 / 9.0,
                     wiou: WiseIoULoss | None = None) -> torch.Tensor:
    """pred_deltas, reference_boxes, gt_boxes: [P, 4] (positives only, boxes xyxy) -> [P].
    loss_type "wiou" needs the head's WiseIoULoss module (it keeps a running mean)."""
    pred_deltas = pred_deltas.float()
    if loss_type in ("smooth_l1", "l1"):
        target_deltas = box_coder.encode_single(gt_boxes.float(), reference_boxes.float())
        if loss_type == "l1":
            return F.l1_loss(pred_deltas, target_deltas, reduction="none").sum(dim=1)
        return F.smooth_l1_loss(pred_deltas, target_deltas, beta=beta, reduction="none").sum(dim=1)
    if loss_type in IOU_LOSSES:
        pred_boxes = box_coder.decode_single(pred_deltas, reference_boxes.float())
        return IOU_LOSSES[loss_type](pred_boxes, gt_boxes.float(), reduction="none")
    if loss_type == "wiou":
        if wiou is None:
            raise ValueError("box loss 'wiou' needs the head's WiseIoULoss module")
        return wiou(box_coder.decode_single(pred_deltas, reference_boxes.float()), gt_boxes.float())
    raise ValueError(f"unknown box loss '{loss_type}' (smooth_l1 | l1 | giou | diou | ciou | wiou)")
