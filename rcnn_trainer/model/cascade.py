"""Cascade R-CNN's RoI heads (Cai & Vasconcelos, CVPR 2018; detectron2's CascadeROIHeads): K box
stages, each refining the boxes of the stage before and trained at a stricter IoU.

Shapes: N images, R sampled RoIs in the batch (the same R boxes go through every stage), P_k the
positives of stage k, C foreground classes, K stages.
Names: stage 1 is BoxHeads' own `box_head` / `box_predictor` / `box_coder` (so a one-stage
checkpoint's keys load into it); stage k >= 2 is `later_stages[k - 2]`. Every stage regresses
class-agnostic `box_deltas` [R, 4] with its own box coder weights.

Training (detectron2's scheme): stage 1 samples RoIs as the one-stage head does (GT boxes
appended to the proposals); stage k >= 2 takes stage k-1's refined boxes of those R RoIs
(detached: no backprop through the boxes, as between the RPN and the RoI head), relabels them
at its own IoU threshold without resampling, and trains on them. Stage 1's losses keep the
one-stage names (`loss_roi_cls`, `loss_roi_box`), stage k's are `loss_roi_cls_s{k}` and
`loss_roi_box_s{k}`, each over its own avg_factor; the trainer weights them (stage_weights via
build_loss_weights). The mask head trains on the last stage's RoIs.
Inference: each stage scores its own input boxes; the class probabilities are averaged over the
stages, the boxes are the last stage's, then torchvision's post-processing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import maskrcnn_inference
from torchvision.ops import box_iou, clip_boxes_to_image

from rcnn_trainer.losses.heads import loss_roi_box, loss_roi_cls
from rcnn_trainer.losses.iou import paired_iou
from rcnn_trainer.losses.wise_iou import wise_iou_for
from rcnn_trainer.model import stats as S
from rcnn_trainer.model.ignore import ignore_overlapping
from rcnn_trainer.model.roi_heads import BoxHeads, _matched_gt_boxes


class AgnosticPredictor(nn.Module):
    """Class logits [R, C+1] and one box delta [R, 4] per RoI (class-agnostic regression, as in
    detectron2's cascade); attribute names as torchvision's FastRCNNPredictor's."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)
        # detectron2's init: near-zero logits (CE = ln(C+1) at start), near-zero deltas (boxes stay put)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


class CascadeStage(nn.Module):
    """A stage after the first: its box head, class-agnostic predictor and box coder."""

    def __init__(self, box_head: nn.Module, box_predictor: AgnosticPredictor, coder_weights: tuple):
        super().__init__()
        self.box_head, self.box_predictor = box_head, box_predictor
        self.box_coder = det_utils.BoxCoder(tuple(float(w) for w in coder_weights))


class CascadeHeads(BoxHeads):
    def __init__(self, *, later_stages: list[CascadeStage], iou_thresholds: list[float], **stage_one):
        """`stage_one`: BoxHeads' arguments with stage 1's IoU threshold, box coder weights and an
        AgnosticPredictor; `iou_thresholds`: every stage's, the first included."""
        super().__init__(**stage_one)
        self.later_stages = nn.ModuleList(later_stages)
        self.stage_matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in iou_thresholds[1:]]
        wiou = [wise_iou_for(self.losses.box) for _ in later_stages]
        self.stage_wiou = nn.ModuleList(wiou) if all(w is not None for w in wiou) else None

    @property
    def num_stages(self) -> int:
        return len(self.later_stages) + 1

    def _predict(self, features, rois, image_shapes):
        """Stage 1 with its class-agnostic deltas repeated per class [R, (C+1) * 4]: the one-stage
        sampling (OHEM), losses and statistics then apply unchanged."""
        class_logits, deltas = super()._predict(features, rois, image_shapes)
        return class_logits, deltas.repeat(1, class_logits.shape[1])

    def _stage_predict(self, stage: CascadeStage, features, rois, image_shapes):
        pooled = self.box_roi_pool(features, rois, image_shapes)
        class_logits, deltas = stage.box_predictor(stage.box_head(pooled))
        return class_logits.float(), deltas.float()

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]], targets: list[dict] | None = None, masks: bool = True):
        """As BoxHeads.forward: (detections, losses, stats)."""
        if not self.training:
            return self._detect(features, proposals, image_shapes, masks), {}, {}
        if targets is None:
            raise ValueError("the RoI heads need targets in training mode")
        rois, gt_labels, matched, from_rpn, matched_per_image = self._sample(proposals, targets, features, image_shapes)
        class_logits, box_deltas = self._predict(features, rois, image_shapes)
        flat = torch.cat(rois)
        losses, stats = self._losses(class_logits, box_deltas, flat, gt_labels, matched, from_rpn, len(rois))
        # stage 1's positive RPN proposals, followed through the stages (the monitor's stage IoUs)
        tracked = torch.where((gt_labels > 0) & from_rpn)[0]
        tracked_gt = matched[tracked]
        boxes = self._refine(self.box_coder, box_deltas[:, :4], flat)
        stats[S.roi_stage_iou(1)] = _mean_iou(boxes[tracked], tracked_gt)
        sizes = [len(r) for r in rois]
        for k, stage in enumerate(self.later_stages, start=2):
            rois = [clip_boxes_to_image(b, shape) for b, shape in zip(boxes.split(sizes), image_shapes)]
            flat = torch.cat(rois)
            gt_labels, matched, matched_per_image = self._relabel(self.stage_matchers[k - 2], rois, targets)
            class_logits, deltas = self._stage_predict(stage, features, rois, image_shapes)
            stage_losses, stage_stats = self._stage_losses(k, stage, class_logits, deltas, flat, gt_labels, matched,
                                                           len(rois))
            losses.update(stage_losses)
            stats.update(stage_stats)
            boxes = self._refine(stage.box_coder, deltas, flat)
            stats[S.roi_stage_iou(k)] = _mean_iou(boxes[tracked], tracked_gt)
        if self.has_mask():  # on the last stage's RoIs and labels, as detectron2
            mask_loss, mask_stats = self._mask_loss(features, rois, gt_labels, matched_per_image, targets, image_shapes)
            losses["loss_roi_mask"] = mask_loss
            stats.update(mask_stats)
        return [], losses, stats

    @staticmethod
    def _refine(box_coder, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """[R, 4] decoded boxes, detached: the next stage's RoIs are inputs, not outputs to train."""
        return box_coder.decode_single(deltas.detach(), boxes.detach())

    @staticmethod
    def _relabel(matcher, rois: list[torch.Tensor], targets: list[dict]):
        """A later stage's labels: each box matched at the stage's IoU threshold (below it:
        background), no resampling. Returns flat [R] labels, [R, 4] matched GT boxes and per
        image the GT index of each box (for its mask)."""
        labels, matched_boxes, matched_per_image = [], [], []
        for boxes, target in zip(rois, targets):
            gt = target["boxes"].to(boxes.dtype)
            if gt.numel():
                idx = matcher(box_iou(gt, boxes))
                label = target["labels"].to(torch.int64)[idx.clamp(min=0)]
                label[idx < 0] = 0
            else:
                idx = torch.full((boxes.shape[0],), -1, dtype=torch.int64, device=boxes.device)
                label = torch.zeros_like(idx)
            # cut objects of a tile (model/ignore.py) are no background here either: -1, left out of the losses
            labels.append(ignore_overlapping(label, boxes, target.get("ignore_boxes"), matcher.low_threshold))
            matched_boxes.append(_matched_gt_boxes(gt, idx.clamp(min=0)))
            matched_per_image.append(idx.clamp(min=0))
        return torch.cat(labels), torch.cat(matched_boxes), matched_per_image

    def _stage_losses(self, k: int, stage: CascadeStage, class_logits, deltas, rois, gt_labels, matched,
                      num_images: int):
        """Stage k's two terms, each over its own avg_factor (losses/heads.py), and its statistics."""
        pos = torch.where(gt_labels > 0)[0]
        kept = torch.where(gt_labels >= 0)[0]  # all but ignored boxes (-1)
        cls, cls_factor = loss_roi_cls(class_logits[kept] + self.class_logit_offsets, gt_labels[kept], self.losses.cls)
        wiou = self.stage_wiou[k - 2] if self.stage_wiou is not None else None
        box, box_factor = loss_roi_box(deltas[pos], rois[pos], matched[pos], kept.numel(), stage.box_coder,
                                       self.losses.box, wiou)
        cls_key, box_key = S.roi_stage_factors(k)
        stats = {cls_key: cls_factor.detach(), box_key: box_factor.detach(), S.roi_stage_pos(k): pos.numel() / num_images}
        return {f"loss_roi_cls_s{k}": cls, f"loss_roi_box_s{k}": box}, stats

    def _detect(self, features, proposals, image_shapes, masks: bool) -> list[dict]:
        """Every stage scores its input boxes; probabilities averaged, boxes from the last stage."""
        class_logits, deltas = super()._predict(features, proposals, image_shapes)
        probs = torch.softmax(class_logits, -1)
        boxes = self._refine(self.box_coder, deltas, torch.cat(proposals))
        sizes = [len(p) for p in proposals]
        for stage in self.later_stages:
            rois = [clip_boxes_to_image(b, shape) for b, shape in zip(boxes.split(sizes), image_shapes)]
            class_logits, deltas = self._stage_predict(stage, features, rois, image_shapes)
            probs = probs + torch.softmax(class_logits, -1)
            boxes = self._refine(stage.box_coder, deltas, torch.cat(rois))
        final = averaged_postprocess(self, probs / self.num_stages, boxes, sizes, image_shapes)
        detections = [{"boxes": b, "labels": l, "scores": s} for b, s, l in zip(*final)]
        if self.has_mask() and masks:
            mask_logits = self._predict_masks(features, final[0], image_shapes)
            for det, mask_probs in zip(detections, maskrcnn_inference(mask_logits, final[2])):
                det["masks"] = mask_probs
        return detections


def averaged_postprocess(heads, probs: torch.Tensor, boxes: torch.Tensor, sizes: list[int], image_shapes):
    """torchvision's post-processing (score threshold, small boxes, per-class NMS, top-k) on the
    averaged probabilities [R, C+1] and the final boxes [R, 4]: passed as log-probabilities (softmax
    gives them back) and as proposals with zero deltas (decoding gives them back)."""
    log_probs = probs.clamp(min=1e-12).log()
    zero_deltas = boxes.new_zeros((boxes.shape[0], 4 * probs.shape[1]))
    return heads.postprocess_detections(log_probs, zero_deltas, list(boxes.split(sizes)), image_shapes)


def _mean_iou(boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """Mean IoU of paired boxes [P, 4]; NaN when P < 2 (the monitor's means skip it)."""
    if boxes.shape[0] < 2:
        return torch.tensor(float("nan"), device=boxes.device)
    return paired_iou(boxes.float(), gt_boxes.float()).mean()


def adapt_one_stage_state(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """`model.init_from` a one-stage Faster / Mask R-CNN file into a cascade: the file's RoI head
    initializes stage 1 (same keys); its class-specific regressor [(C'+1) * 4, D], averaged over
    its foreground classes, starts stage 1's class-agnostic one [4, D]. Later stages keep their
    init unless the file is a cascade. Returns the state to load and what to log."""
    heads = getattr(model, "roi_heads", None)
    if not isinstance(heads, CascadeHeads):
        return state, []
    notes = []
    weight, bias = "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"
    ours = heads.box_predictor.bbox_pred.weight
    if (weight in state and bias in state and state[weight].dim() == 2 and state[weight].shape[0] > 4
            and state[weight].shape[0] % 4 == 0 and state[weight].shape[1] == ours.shape[1]):
        state = dict(state)
        for key in (weight, bias):
            per_class = state[key].reshape(-1, 4, *state[key].shape[1:])
            state[key] = per_class[1:].float().mean(dim=0).to(state[key].dtype)
        notes.append(f"cascade stage 1's class-agnostic box regressor: the file's per-class one averaged over its "
                     f"{per_class.shape[0] - 1} foreground classes")
    if not any(k.startswith("roi_heads.later_stages.") for k in state):
        notes.append(f"cascade: the file's RoI head initializes stage 1 (roi_heads.box_head, roi_heads.box_predictor); "
                     f"stages 2-{heads.num_stages} (roi_heads.later_stages) keep their init")
    return state, notes
