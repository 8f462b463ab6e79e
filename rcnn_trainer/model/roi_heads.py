"""RoI heads (boxes, and masks when a mask branch is given): torchvision's RoIHeads with our
losses and statistics.

Shapes: N images, R sampled RoIs in the batch, P positive RoIs, C foreground classes.
Names: `class_logits` [R, C+1] (column 0 = background), `box_deltas` [R, (C+1) * 4]
class-specific, `gt_labels` [R] in 0..C, `matched_gt_boxes` [R, 4]; `mask_logits` [P, C+1, M, M]
class-specific (M = 28: twice the mask RoIAlign's output).

Subclassed from torchvision's RoIHeads for the same reason as the RPN (matching, sampling,
post-processing and state-dict keys stay torchvision's). The training path spells out
sampling so that the ground-truth boxes appended to the proposals can be told apart: the
mean IoU of positive proposals is measured on real RPN proposals only.
"""

from __future__ import annotations

import torch
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, project_masks_on_boxes

from rcnn_trainer.losses.box import box_loss_per_box
from rcnn_trainer.losses.classification import class_logit_offsets, class_loss_per_roi
from rcnn_trainer.losses.heads import loss_roi_box, loss_roi_cls, loss_roi_mask
from rcnn_trainer.losses.iou import paired_iou
from rcnn_trainer.losses.settings import BoxLoss, ClsLoss, HeadLosses
from rcnn_trainer.losses.wise_iou import wise_iou_for
from rcnn_trainer.model import stats as S
from rcnn_trainer.model.ignore import ignore_overlapping
from rcnn_trainer.model.stats import delta_agreement, mask_agreement, refined_box_iou


class BoxHeads(RoIHeads):
    def __init__(self, *, box_roi_pool, box_head, box_predictor, fg_iou_thresh: float, bg_iou_thresh: float,
                 batch_size_per_image: int, positive_fraction: float, bbox_reg_weights: tuple,
                 score_thresh: float, nms_thresh: float, detections_per_img: int,
                 losses: HeadLosses = HeadLosses(ClsLoss("ce"), BoxLoss()), sampler: str = "random",
                 mask_roi_pool=None, mask_head=None, mask_predictor=None):
        super().__init__(box_roi_pool, box_head, box_predictor, fg_iou_thresh, bg_iou_thresh,
                         batch_size_per_image, positive_fraction, bbox_reg_weights, score_thresh,
                         nms_thresh, detections_per_img, mask_roi_pool=mask_roi_pool, mask_head=mask_head,
                         mask_predictor=mask_predictor)
        if sampler not in ("random", "ohem"):
            raise ValueError(f"unknown RoI sampler '{sampler}' (random | ohem)")
        self.sampler = sampler
        self.losses = losses
        # Wise-IoU keeps a running mean (a buffer saved with the model); other losses are stateless.
        self.box_wiou = wise_iou_for(losses.box)
        # logit adjustment, set from the training data (`set_class_counts`); not saved: training
        # recomputes it, inference does not use it
        num_logits = box_predictor.cls_score.out_features
        self.register_buffer("class_logit_offsets", torch.zeros(num_logits), persistent=False)
        # the mask predictor upsamples the pooled features 2x (torchvision's MaskRCNNPredictor)
        self.mask_size = 2 * _pool_size(mask_roi_pool) if mask_roi_pool is not None else 0

    def set_class_counts(self, object_counts) -> None:
        """The training objects per foreground class (as the sampler draws them), for
        `losses.cls.logit_adjust`; no effect when that is 0."""
        if not self.losses.cls.logit_adjust:
            return
        offsets = class_logit_offsets(object_counts, self.losses.cls.logit_adjust)
        if offsets.shape != self.class_logit_offsets.shape:
            raise ValueError(f"{len(object_counts)} class counts for a head of {self.class_logit_offsets.numel() - 1} "
                             f"classes")
        self.class_logit_offsets.copy_(offsets)

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]], targets: list[dict] | None = None, masks: bool = True):
        """Returns (detections: list of {boxes, labels, scores[, masks]}, losses, stats). Masks are
        probabilities [D, 1, M, M] in each detection's box (the detector pastes them)."""
        if not self.training:
            class_logits, box_deltas = self._predict(features, proposals, image_shapes)
            boxes, scores, labels = self.postprocess_detections(class_logits, box_deltas, proposals, image_shapes)
            detections = [{"boxes": b, "labels": l, "scores": s} for b, l, s in zip(boxes, labels, scores)]
            if self.has_mask() and masks:
                mask_logits = self._predict_masks(features, boxes, image_shapes)
                for det, probs in zip(detections, maskrcnn_inference(mask_logits, labels)):
                    det["masks"] = probs
            return detections, {}, {}
        if targets is None:
            raise ValueError("the RoI heads need targets in training mode")
        sample = self._sample(proposals, targets, features, image_shapes)
        rois, gt_labels, matched_gt_boxes, from_rpn, matched_per_image = sample
        class_logits, box_deltas = self._predict(features, rois, image_shapes)
        losses, stats = self._losses(class_logits, box_deltas, torch.cat(rois), gt_labels, matched_gt_boxes,
                                     from_rpn, len(rois))
        if self.has_mask():
            mask_loss, mask_stats = self._mask_loss(features, rois, gt_labels, matched_per_image, targets, image_shapes)
            losses["loss_roi_mask"] = mask_loss
            stats.update(mask_stats)
        return [], losses, stats

    def _predict_masks(self, features, boxes: list[torch.Tensor], image_shapes) -> torch.Tensor:
        pooled = self.mask_roi_pool(features, boxes, image_shapes)
        return self.mask_predictor(self.mask_head(pooled)).float()  # fp32 for the loss under autocast

    def _mask_loss(self, features, rois, gt_labels, matched_per_image, targets, image_shapes):
        """loss_roi_mask on the positive RoIs: each one's logits of its own GT class against its
        GT mask cropped to the RoI and resized to M x M (torchvision's RoIAlign projection)."""
        labels_per_image = gt_labels.split([len(r) for r in rois])
        pos_rois, pos_labels, mask_targets = [], [], []
        for r, labels, matched, target in zip(rois, labels_per_image, matched_per_image, targets):
            pos = torch.where(labels > 0)[0]
            pos_rois.append(r[pos])
            pos_labels.append(labels[pos])
            mask_targets.append(self._mask_targets(target, r[pos], matched[pos]))
        mask_logits = self._predict_masks(features, pos_rois, image_shapes)
        labels = torch.cat(pos_labels)
        own = mask_logits[torch.arange(labels.numel(), device=labels.device), labels]
        mask_targets = torch.cat(mask_targets)
        loss, factor = loss_roi_mask(own, mask_targets)
        with torch.no_grad():
            iou, trivial_iou = mask_agreement(own, mask_targets)
        return loss, {S.ROI_MASK_FACTOR: factor.detach(), S.ROI_MASK_IOU: iou, S.ROI_MASK_TRIVIAL_IOU: trivial_iou}

    def _mask_targets(self, target: dict, boxes: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
        size = self.mask_size
        if "masks" not in target:
            raise ValueError("model.mask.enabled needs targets with 'masks' (the dataset reads them when it is on)")
        if not boxes.numel():
            return boxes.new_zeros((0, size, size))
        return project_masks_on_boxes(target["masks"], boxes, matched, size)

    def _predict(self, features, rois, image_shapes):
        pooled = self.box_roi_pool(features, rois, image_shapes)
        class_logits, box_deltas = self.box_predictor(self.box_head(pooled))
        return class_logits.float(), box_deltas.float()  # fp32 for decoding and losses under autocast

    def _sample(self, proposals, targets, features, image_shapes):
        """The RoIs to train on: per image a list of boxes, and over the batch flat [R] labels,
        [R, 4] matched GT boxes and [R] whether the RoI came from the RPN (not an appended GT),
        and per image the GT index each RoI matched (for its mask).
        Matching and random sampling are torchvision's own, image by image."""
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        num_rpn = [p.shape[0] for p in proposals]
        proposals = self.add_gt_proposals(proposals, gt_boxes)  # the GT boxes themselves are RoIs too
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes,
                                                                [t["labels"].to(torch.int64) for t in targets])
        labels = [ignore_overlapping(l, p, t.get("ignore_boxes"), self.proposal_matcher.low_threshold)
                  for l, p, t in zip(labels, proposals, targets)]  # cut objects of a tile (model/ignore.py)
        if self.sampler == "ohem":
            chosen = self._hardest(features, proposals, labels, matched_idxs, gt_boxes, image_shapes)
        else:
            chosen = self.subsample(labels)  # per image, in index order
        rois = [p[inds] for p, inds in zip(proposals, chosen)]
        gt_labels = torch.cat([l[inds] for l, inds in zip(labels, chosen)])
        matched = torch.cat([_matched_gt_boxes(g, m[inds]) for g, m, inds in zip(gt_boxes, matched_idxs, chosen)])
        from_rpn = torch.cat([inds < n for inds, n in zip(chosen, num_rpn)])
        matched_per_image = [m[inds].clamp(min=0) for m, inds in zip(matched_idxs, chosen)]  # GT index of each RoI
        return rois, gt_labels, matched, from_rpn, matched_per_image

    @torch.no_grad()
    def _hardest(self, features, proposals, labels, matched_idxs, gt_boxes, image_shapes) -> list[torch.Tensor]:
        """OHEM: per image, the RoIs with the highest current loss (classification + smooth L1 of
        positives; smooth L1 ranks cheaply whatever the training box loss is)."""
        class_logits, box_deltas = self._predict(features, proposals, image_shapes)
        all_labels = torch.cat(labels)
        cls = self.losses.cls
        per_roi = class_loss_per_roi(class_logits + self.class_logit_offsets, all_labels.clamp(min=0), loss_type=cls.type,
                                     pos_weight=cls.pos_weight, gamma=cls.gamma)
        pos = torch.where(all_labels > 0)[0]
        if pos.numel():
            matched = torch.cat([_matched_gt_boxes(g, m) for g, m in zip(gt_boxes, matched_idxs)])
            deltas = box_deltas.reshape(box_deltas.shape[0], -1, 4)[pos, all_labels[pos]]
            per_roi[pos] += box_loss_per_box(deltas, torch.cat(proposals)[pos], matched[pos], self.box_coder,
                                             loss_type="smooth_l1")
        chosen = []
        for loss_i, labels_i in zip(per_roi.split([len(p) for p in proposals]), labels):
            chosen.append(select_hardest(loss_i, labels_i, self.fg_bg_sampler.batch_size_per_image,
                                         self.fg_bg_sampler.positive_fraction))
        return chosen

    def _losses(self, class_logits, box_deltas, rois, gt_labels, matched_gt_boxes, from_rpn, num_images):
        pos = torch.where(gt_labels > 0)[0]
        deltas_of_gt_class = box_deltas.reshape(box_deltas.shape[0], -1, 4)[pos, gt_labels[pos]]
        cls, cls_factor = loss_roi_cls(class_logits + self.class_logit_offsets, gt_labels, self.losses.cls)
        box, box_factor = loss_roi_box(deltas_of_gt_class, rois[pos], matched_gt_boxes[pos], gt_labels.numel(),
                                       self.box_coder, self.losses.box, self.box_wiou)
        real = pos[from_rpn[pos]]
        with torch.no_grad():
            ious = paired_iou(rois[real], matched_gt_boxes[real])
            fg_argmax = (class_logits.argmax(dim=1) > 0).float().mean()
            # IoU on RPN proposals only (an appended GT box starts at IoU 1); the deltas on every
            # positive, so that even an untrained RPN gives the regressor statistics
            pred_iou = refined_box_iou(deltas_of_gt_class[from_rpn[pos]], rois[real], matched_gt_boxes[real],
                                       self.box_coder)
            delta_ratio, delta_corr = delta_agreement(deltas_of_gt_class, rois[pos], matched_gt_boxes[pos],
                                                      self.box_coder)
        stats = {
            S.ROI_CLS_FACTOR: cls_factor.detach(),
            S.ROI_BOX_FACTOR: box_factor.detach(),
            S.ROI_POS: pos.numel() / num_images,
            S.ROI_NEG: (gt_labels.numel() - pos.numel()) / num_images,
            S.ROI_PROPOSAL_IOU: ious.mean() if ious.numel() else float("nan"),
            S.ROI_FG_ARGMAX: fg_argmax,
            S.ROI_BOX_PER_POS: box.detach() * box_factor / max(pos.numel(), 1),
            S.ROI_PRED_IOU: pred_iou,
            S.ROI_DELTA_STD_RATIO: delta_ratio,
            S.ROI_DELTA_CORR: delta_corr,
        }
        return {"loss_roi_cls": cls, "loss_roi_box": box}, stats


def _pool_size(roi_pool) -> int:
    size = roi_pool.output_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _matched_gt_boxes(gt_boxes: torch.Tensor, matched_idxs: torch.Tensor) -> torch.Tensor:
    """The GT box of each RoI; an image without GT gets a dummy box (its RoIs are all background)."""
    if not gt_boxes.numel():
        gt_boxes = torch.zeros((1, 4), dtype=gt_boxes.dtype, device=gt_boxes.device)
    return gt_boxes[matched_idxs]


def select_hardest(losses: torch.Tensor, labels: torch.Tensor, num: int, positive_fraction: float) -> torch.Tensor:
    """Indices of the highest-loss positives (labels > 0, at most num * positive_fraction) and the
    highest-loss negatives (labels == 0) filling the rest of `num`; ignored RoIs (-1) never."""
    pos = torch.where(labels > 0)[0]
    neg = torch.where(labels == 0)[0]
    num_pos = min(int(num * positive_fraction), pos.numel())
    num_neg = min(num - num_pos, neg.numel())
    top_pos = pos[losses[pos].topk(num_pos).indices]
    top_neg = neg[losses[neg].topk(num_neg).indices]
    return torch.cat([top_pos, top_neg])
