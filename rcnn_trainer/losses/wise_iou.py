"""Wise-IoU v3 (Tong et al. 2023): IoU loss with dynamic non-monotonic focusing.

  L_IoU  = 1 - IoU(pred, gt)
  R      = exp(((x - x_gt)^2 + (y - y_gt)^2) / (W_g^2 + H_g^2))    (W_g, H_g: enclosing box; denominator detached)
  beta   = L_IoU (detached) / running mean of L_IoU                  (outlier degree)
  r      = beta / (delta * alpha ** (beta - delta))
  loss   = r * R * L_IoU

The running mean is a buffer (saved with the model, so in every checkpoint), updated in
training mode with `momentum` from the batch mean of L_IoU; under DDP that batch mean is
all-reduced first, so every rank keeps the same statistic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from rcnn_trainer.dist_state import is_distributed
from rcnn_trainer.losses.iou import paired_iou


class WiseIoULoss(nn.Module):
    def __init__(self, alpha: float = 1.9, delta: float = 3.0, momentum: float = 0.01):
        super().__init__()
        self.alpha, self.delta, self.momentum = alpha, delta, momentum
        self.register_buffer("iou_loss_mean", torch.tensor(1.0))

    @torch.no_grad()
    def _update_mean(self, iou_loss: torch.Tensor) -> None:
        """Called on every rank at every training step, also with no positives (P = 0): the
        all_reduce is a collective, and a rank that skipped it would hang the others."""
        stats = torch.stack([iou_loss.sum(), torch.tensor(float(iou_loss.numel()), device=iou_loss.device)])
        if is_distributed():
            dist.all_reduce(stats)
        batch_mean = stats[0] / stats[1].clamp(min=1.0)
        updated = self.iou_loss_mean * (1.0 - self.momentum) + self.momentum * batch_mean
        self.iou_loss_mean.copy_(torch.where(stats[1] > 0, updated, self.iou_loss_mean))  # no host sync

    def forward(self, pred_boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """pred_boxes, gt_boxes: [P, 4] xyxy -> per-box loss [P]."""
        pred_boxes, gt_boxes = pred_boxes.float(), gt_boxes.float()
        iou_loss = 1.0 - paired_iou(pred_boxes, gt_boxes)
        if self.training:
            self._update_mean(iou_loss.detach())
        if pred_boxes.numel() == 0:
            return pred_boxes.sum(dim=1) * 0.0
        centre_p = (pred_boxes[:, :2] + pred_boxes[:, 2:]) / 2
        centre_g = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        enclosing_wh = torch.max(pred_boxes[:, 2:], gt_boxes[:, 2:]) - torch.min(pred_boxes[:, :2], gt_boxes[:, :2])
        distance = ((centre_p - centre_g) ** 2).sum(dim=1)
        r_wiou = torch.exp(distance / (enclosing_wh ** 2).sum(dim=1).clamp(min=1e-7).detach())
        beta = iou_loss.detach() / self.iou_loss_mean
        focus = beta / (self.delta * self.alpha ** (beta - self.delta))
        return focus * r_wiou * iou_loss


def wise_iou_for(box: "BoxLoss") -> WiseIoULoss | None:
    """The head's Wise-IoU module when its box loss is wiou (it keeps a running mean, saved with
    the model); None for the stateless losses."""
    if box.type != "wiou":
        return None
    return WiseIoULoss(alpha=box.wiou_alpha, delta=box.wiou_delta, momentum=box.wiou_momentum)
