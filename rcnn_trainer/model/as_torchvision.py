"""Our model as torchvision's FasterRCNN / MaskRCNN: the same modules (backbone, anchor
generator, RPN head, box and mask heads, so the same weights), inside torchvision's
GeneralizedRCNN with its own resize and normalization, RoIAlign kernel, box coder and
post-processing. The benchmarks compare against it at identical settings; rcnn-export exports
it, since torchvision keeps that model traceable and scriptable (its RoIAlign and NMS export as
torchvision's ops), which our training-time parts (the sparse RoIAlign, the stats) are not.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.ops import MultiScaleRoIAlign

from rcnn_trainer.config import Config
from rcnn_trainer.model.cascade_export import ExportCascadeHeads


def torchvision_detector(ours: nn.Module, cfg: Config) -> FasterRCNN:
    r, o = cfg.model.rpn, cfg.model.roi
    heads = ours.roi_heads
    masks = {}
    if heads.has_mask():
        m = cfg.model.mask
        masks = {"mask_roi_pool": MultiScaleRoIAlign(heads.box_roi_pool.featmap_names, m.pool_size, m.sampling_ratio),
                 "mask_head": heads.mask_head, "mask_predictor": heads.mask_predictor}
    transform = ours.transform
    detector = (MaskRCNN if masks else FasterRCNN)(
        ours.backbone, num_classes=None, min_size=cfg.data.test_min_size, max_size=cfg.data.max_size,
        image_mean=transform.image_mean, image_std=transform.image_std,
        rpn_anchor_generator=ours.rpn.anchor_generator, rpn_head=ours.rpn.head,
        rpn_pre_nms_top_n_train=r.pre_nms_top_n_train, rpn_pre_nms_top_n_test=r.pre_nms_top_n_test,
        rpn_post_nms_top_n_train=r.post_nms_top_n_train, rpn_post_nms_top_n_test=r.post_nms_top_n_test,
        rpn_nms_thresh=r.nms_thresh, rpn_fg_iou_thresh=r.fg_iou_thresh, rpn_bg_iou_thresh=r.bg_iou_thresh,
        rpn_batch_size_per_image=r.batch_size_per_image, rpn_positive_fraction=r.positive_fraction,
        rpn_score_thresh=r.score_thresh,
        box_roi_pool=MultiScaleRoIAlign(heads.box_roi_pool.featmap_names, o.pool_size, o.sampling_ratio),
        box_head=heads.box_head, box_predictor=heads.box_predictor, box_score_thresh=o.score_thresh,
        box_nms_thresh=o.nms_thresh, box_detections_per_img=o.detections_per_img,
        box_fg_iou_thresh=o.fg_iou_thresh, box_bg_iou_thresh=o.bg_iou_thresh,
        box_batch_size_per_image=o.batch_size_per_image, box_positive_fraction=o.positive_fraction,
        bbox_reg_weights=tuple(heads.box_coder.weights), **masks)
    if hasattr(heads, "later_stages"):  # Cascade R-CNN (model/cascade.py): its stages after the first
        detector.roi_heads = ExportCascadeHeads(detector.roi_heads, heads.later_stages)
    return detector
