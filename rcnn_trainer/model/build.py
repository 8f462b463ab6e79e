"""build_model(cfg): the only place that reads the model config."""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead

from rcnn_trainer.config import ModelConfig
from rcnn_trainer.model.backbone import build_backbone
from rcnn_trainer.model.detector import TwoStageDetector
from rcnn_trainer.model.roi_align import multi_scale_roi_align
from rcnn_trainer.model.roi_heads import BoxHeads
from rcnn_trainer.model.rpn import RPN


def build_model(cfg: ModelConfig) -> TwoStageDetector:
    if cfg.unresolved():
        raise ValueError(f"{', '.join('model.' + key for key in cfg.unresolved())} still 'auto': resolve them "
                         f"from the data first (rcnn_trainer/engine/data_settings.py)")
    b = cfg.backbone
    backbone = build_backbone(b.name, weights=b.weights, trainable_layers=b.trainable_layers,
                              norm=b.norm, fpn_channels=b.fpn_channels)
    num_levels = len(cfg.anchors.sizes)
    anchor_generator = AnchorGenerator(sizes=tuple(tuple(s) for s in cfg.anchors.sizes),
                                       aspect_ratios=(tuple(cfg.anchors.aspect_ratios),) * num_levels)
    r = cfg.rpn
    rpn = RPN(
        anchor_generator=anchor_generator,
        head=RPNHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0]),
        fg_iou_thresh=r.fg_iou_thresh, bg_iou_thresh=r.bg_iou_thresh,
        batch_size_per_image=r.batch_size_per_image, positive_fraction=r.positive_fraction,
        pre_nms_top_n={"training": r.pre_nms_top_n_train, "testing": r.pre_nms_top_n_test},
        post_nms_top_n={"training": r.post_nms_top_n_train, "testing": r.post_nms_top_n_test},
        nms_thresh=r.nms_thresh, score_thresh=r.score_thresh,
        cls_loss_type=r.cls_loss.type, cls_pos_weight=r.cls_pos_weight, focal_alpha=r.cls_loss.alpha,
        focal_gamma=r.cls_loss.gamma, cls_avg_factor=r.cls_loss.avg_factor,
        box_loss_type=r.box_loss.type, box_beta=r.box_loss.beta, box_avg_factor=r.box_loss.avg_factor,
        wiou=_wiou_args(r.box_loss))
    o = cfg.roi
    feature_names = [str(i) for i in range(num_levels - 1)]  # every FPN level but the extra "pool"
    predictor = FastRCNNPredictor(o.representation_size, cfg.num_classes + 1)
    _init_predictor(predictor)
    roi_heads = BoxHeads(
        box_roi_pool=multi_scale_roi_align(o.roi_align, feature_names, o.pool_size, o.sampling_ratio),
        box_head=TwoMLPHead(backbone.out_channels * o.pool_size ** 2, o.representation_size),
        box_predictor=predictor,
        fg_iou_thresh=o.fg_iou_thresh, bg_iou_thresh=o.bg_iou_thresh,
        batch_size_per_image=o.batch_size_per_image, positive_fraction=o.positive_fraction,
        bbox_reg_weights=tuple(o.bbox_reg_weights), score_thresh=o.score_thresh,
        nms_thresh=o.nms_thresh, detections_per_img=o.detections_per_img,
        cls_loss_type=o.cls_loss.type, cls_pos_weight=o.cls_pos_weight, focal_gamma=o.cls_loss.gamma,
        cls_avg_factor=o.cls_loss.avg_factor, box_loss_type=o.box_loss.type, box_beta=o.box_loss.beta,
        box_avg_factor=o.box_loss.avg_factor, wiou=_wiou_args(o.box_loss), sampler=o.sampler)
    return TwoStageDetector(backbone=backbone, rpn=rpn, roi_heads=roi_heads)


def _wiou_args(box_loss) -> dict:
    return {"alpha": box_loss.wiou_alpha, "delta": box_loss.wiou_delta, "momentum": box_loss.wiou_momentum}


def _init_predictor(predictor: FastRCNNPredictor) -> None:
    """detectron2's init: near-zero logits give CE = ln(C+1) at start, near-zero deltas keep
    the first boxes at the proposals. (nn.Linear's default init starts both far from that.)"""
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)
