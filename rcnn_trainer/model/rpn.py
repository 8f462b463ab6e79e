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
from rcnn_trainer.model.ignore import ignore_overlapping
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
        # torchvision's Matcher and sampler, image by image (1 fg, 0 bg, -1 ignored per anchor)
        targets = [{**t, "boxes": t["boxes"].to(anchors[0].dtype)} for t in targets]
        gt_labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
        # ignore regions (cut objects of a tile, model/ignore.py) are neither fg nor bg
        gt_labels = [ignore_overlapping(l, a, t.get("ignore_boxes"), self.proposal_matcher.low_threshold)
                     for l, a, t in zip(gt_labels, anchors, targets)]
        losses, stats = self._losses(objectness.flatten(), pred_deltas, gt_labels, matched_gt_boxes, anchors)
        return boxes, losses, stats

    def _losses(self, objectness, pred_deltas, gt_labels, matched_gt_boxes, anchors):
        """Per image lists of labels [A], matched GT boxes [A, 4] and anchors [A, 4]."""
        num_images = len(gt_labels)
        pos_masks, neg_masks = self.fg_bg_sampler(gt_labels)
        pos = torch.where(torch.cat(pos_masks))[0]
        neg = torch.where(torch.cat(neg_masks))[0]
        sampled = torch.cat([pos, neg])
        labels = torch.cat(gt_labels)
        anchors = torch.cat(anchors)
        matched_gt_boxes = torch.cat(matched_gt_boxes)

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
