"""Cascade R-CNN inside torchvision's GeneralizedRCNN, for rcnn-export (model/as_torchvision.py).

The same modules and weights as model/cascade.py's CascadeHeads, the inference path only, on
torchvision's RoIAlign kernel, written so that torch.jit.script compiles it and ONNX tracing
follows it (typed signature of torchvision's RoIHeads.forward, no Python-only statistics).
Shapes: R proposals over the batch, C+1 classes; each stage's deltas [R, 4] (class-agnostic).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.ops import boxes as box_ops


class ExportCascadeHeads(RoIHeads):
    def __init__(self, heads: RoIHeads, later_stages: nn.ModuleList):
        """`heads`: torchvision's RoIHeads holding stage 1 (box pool, head, predictor, box coder with
        stage 1's weights) and the mask branch; `later_stages`: CascadeHeads.later_stages."""
        super().__init__(heads.box_roi_pool, heads.box_head, heads.box_predictor, 0.5, 0.5, 512, 0.25,
                         heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
                         mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head,
                         mask_predictor=heads.mask_predictor)
        self.later_stages = later_stages

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        sizes = [p.shape[0] for p in proposals]
        class_logits, deltas = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals, image_shapes)))
        probs = F.softmax(class_logits, -1)
        boxes = self.box_coder.decode_single(deltas, torch.cat(proposals))
        for stage in self.later_stages:
            rois = [box_ops.clip_boxes_to_image(b, shape) for b, shape in zip(boxes.split(sizes), image_shapes)]
            class_logits, deltas = stage.box_predictor(stage.box_head(self.box_roi_pool(features, rois, image_shapes)))
            probs = probs + F.softmax(class_logits, -1)
            boxes = stage.box_coder.decode_single(deltas, torch.cat(rois))
        probs = probs / float(len(self.later_stages) + 1)
        # torchvision's post-processing on the averaged probabilities (as log-probabilities) and the
        # last stage's boxes (as proposals with zero deltas), as CascadeHeads does
        zero_deltas = torch.zeros((boxes.shape[0], 4 * probs.shape[1]), dtype=boxes.dtype, device=boxes.device)
        final_boxes, scores, labels = self.postprocess_detections(probs.clamp(min=1e-12).log(), zero_deltas,
                                                                  list(boxes.split(sizes)), image_shapes)
        result: List[Dict[str, Tensor]] = []
        for b, s, l in zip(final_boxes, scores, labels):
            result.append({"boxes": b, "labels": l, "scores": s})
        if self.has_mask():
            if self.mask_roi_pool is None or self.mask_head is None or self.mask_predictor is None:
                raise RuntimeError("the mask branch is incomplete")
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, final_boxes, image_shapes)))
            for mask_probs, r in zip(maskrcnn_inference(mask_logits, labels), result):
                r["masks"] = mask_probs
        return result, {}
