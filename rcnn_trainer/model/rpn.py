"""Region proposal network: torchvision's RPN with our losses and statistics.

Shapes: N images, A anchors in the batch (all levels), S sampled anchors, P positives.
Names: `objectness` [A] logits, `pred_deltas` [A, 4], `gt_labels` per anchor (1 fg, 0 bg,
-1 ignored), `matched_gt_boxes` [A, 4].

We subclass torchvision's RegionProposalNetwork (the one place we inherit from a torchvision
module) so that anchor generation, matching, proposal selection and the state-dict keys are
torchvision's own: weights load both ways and detections match at equal settings. Only the
forward pass changes: the losses go through losses/heads.py with explicit avg_factors, and
the statistics the monitor needs are returned next to them.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers

from rcnn_trainer.model import stats as S
from rcnn_trainer.model.matching import BETWEEN, match_with, pad_boxes, sample_balanced
from rcnn_trainer.model.stats import refined_box_iou

from rcnn_trainer.losses.heads import loss_rpn_box, loss_rpn_cls
from rcnn_trainer.losses.settings import BoxLoss, ClsLoss, HeadLosses
from rcnn_trainer.losses.wise_iou import wise_iou_for


class RPN(RegionProposalNetwork):
    def __init__(self, *, anchor_generator: AnchorGenerator, head: nn.Module,
                 fg_iou_thresh: float, bg_iou_thresh: float, batch_size_per_image: int,
                 positive_fraction: float, pre_nms_top_n: dict[str, int], post_nms_top_n: dict[str, int],
                 nms_thresh: float, score_thresh: float = 0.0,
                 losses: HeadLosses = HeadLosses(ClsLoss("bce"), BoxLoss())):
        super().__init__(anchor_generator, head, fg_iou_thresh, bg_iou_thresh, batch_size_per_image,
                         positive_fraction, pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh)
        self.losses = losses
        # Wise-IoU keeps a running mean (a buffer saved with the model); other losses are stateless.
        self.box_wiou = wise_iou_for(losses.box)

    def forward(self, images: ImageList, features: dict[str, torch.Tensor], targets: list[dict] | None = None):
        """Returns (proposals: list of [K_i, 4], losses: dict, stats: dict)."""
        features_list = list(features.values())
        objectness, pred_deltas = self.head(features_list)
        # under autocast the head answers in bf16/fp16; proposals, matching and losses need fp32
        objectness, pred_deltas = [o.float() for o in objectness], [d.float() for d in pred_deltas]
        anchors = self.anchor_generator(images, features_list)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, pred_deltas = concat_box_prediction_layers(objectness, pred_deltas)
        # Faster R-CNN does not backprop through the proposals: decode detached deltas.
        proposals = self.box_coder.decode(pred_deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, _scores = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        if not self.training:
            return boxes, {}, {}
        if targets is None:
            raise ValueError("the RPN needs targets in training mode")
        anchors = torch.stack(anchors)  # [N, A, 4]: every image has the same anchors
        gt_labels, matched_gt_boxes = self.assign_targets(anchors, targets)
        losses, stats = self._losses(objectness.flatten(), pred_deltas, gt_labels, matched_gt_boxes, anchors)
        return boxes, losses, stats

    def assign_targets(self, anchors: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """torchvision's assign_targets_to_anchors for the whole batch at once: labels [N, A]
        (1 fg, 0 bg, -1 ignored) and matched GT boxes [N, A, 4] of anchors [N, A, 4]."""
        gt, gt_valid = pad_boxes([t["boxes"].to(anchors.dtype) for t in targets])
        matches = match_with(self.proposal_matcher, gt, gt_valid, anchors)
        labels = (matches >= 0).to(anchors.dtype).masked_fill(matches == BETWEEN, -1.0)
        if gt.shape[1] == 0:  # no GT in the whole batch: every anchor is background
            return labels, torch.zeros_like(anchors)
        matched = gt.gather(1, matches.clamp(min=0)[..., None].expand(-1, -1, 4))
        return labels, matched

    def _losses(self, objectness, pred_deltas, gt_labels, matched_gt_boxes, anchors):
        num_images = gt_labels.shape[0]
        pos_mask, neg_mask = sample_balanced(gt_labels, self.fg_bg_sampler.batch_size_per_image,
                                             self.fg_bg_sampler.positive_fraction)
        pos = torch.where(pos_mask.flatten())[0]
        neg = torch.where(neg_mask.flatten())[0]
        sampled = torch.cat([pos, neg])
        labels = gt_labels.flatten()
        anchors = anchors.reshape(-1, 4)
        matched_gt_boxes = matched_gt_boxes.reshape(-1, 4)

        cls, cls_factor = loss_rpn_cls(objectness[sampled], labels[sampled], self.losses.cls)
        box, box_factor = loss_rpn_box(pred_deltas[pos], anchors[pos], matched_gt_boxes[pos], sampled.numel(),
                                       self.box_coder, self.losses.box, self.box_wiou)
        with torch.no_grad():
            pred_iou = refined_box_iou(pred_deltas[pos], anchors[pos], matched_gt_boxes[pos], self.box_coder)
        stats = {
            S.RPN_CLS_FACTOR: cls_factor.detach(),
            S.RPN_BOX_FACTOR: box_factor.detach(),
            S.RPN_POS: pos.numel() / num_images,
            S.RPN_NEG: neg.numel() / num_images,
            S.RPN_BOX_PER_POS: box.detach() * box_factor / max(pos.numel(), 1),
            S.RPN_PRED_IOU: pred_iou,
        }
        return {"loss_rpn_cls": cls, "loss_rpn_box": box}, stats
