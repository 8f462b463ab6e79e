"""build_model(cfg) and build_loss_weights(cfg): the only places that read the model config."""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead

from rcnn_trainer.config import ModelConfig, WeightRamp
from rcnn_trainer.losses.settings import head_losses
from rcnn_trainer.losses.weighting import LossWeights, Ramp, TermWeight
from rcnn_trainer.model.backbone import build_backbone
from rcnn_trainer.model.cascade import AgnosticPredictor, CascadeHeads, CascadeStage
from rcnn_trainer.model.detector import TwoStageDetector
from rcnn_trainer.model.roi_align import multi_scale_roi_align
from rcnn_trainer.model.roi_heads import BoxHeads
from rcnn_trainer.model.rpn import RPN


def build_model(cfg: ModelConfig) -> TwoStageDetector:
    if cfg.unresolved():
        raise ValueError(f"{', '.join('model.' + key for key in cfg.unresolved())} still 'auto': resolve them "
                         f"from the data first (rcnn_trainer/data/settings.py)")
    b = cfg.backbone
    backbone = build_backbone(b.name, weights=b.weights, trainable_layers=b.trainable_layers,
                              norm=b.norm, fpn_channels=b.fpn_channels, trained_later=cfg.init_from is not None)
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
        nms_thresh=r.nms_thresh, score_thresh=r.score_thresh, losses=head_losses(r))
    o = cfg.roi
    feature_names = [str(i) for i in range(num_levels - 1)]  # every FPN level but the extra "pool"
    if o.cascade is None:
        predictor = FastRCNNPredictor(o.representation_size, cfg.num_classes + 1)
        _init_predictor(predictor)
    else:  # stage 1 of the cascade: class-agnostic boxes, the cascade's first IoU and box coder
        predictor = AgnosticPredictor(o.representation_size, cfg.num_classes + 1)
    first_iou = o.fg_iou_thresh if o.cascade is None else o.cascade.iou_thresholds[0]
    heads = dict(
        box_roi_pool=multi_scale_roi_align(o.roi_align, feature_names, o.pool_size, o.sampling_ratio),
        box_head=TwoMLPHead(backbone.out_channels * o.pool_size ** 2, o.representation_size),
        box_predictor=predictor,
        fg_iou_thresh=first_iou, bg_iou_thresh=o.bg_iou_thresh if o.cascade is None else first_iou,
        batch_size_per_image=o.batch_size_per_image, positive_fraction=o.positive_fraction,
        bbox_reg_weights=tuple(o.bbox_reg_weights if o.cascade is None else o.cascade.box_coder_weights[0]),
        score_thresh=o.score_thresh,
        nms_thresh=o.nms_thresh, detections_per_img=o.detections_per_img, losses=head_losses(o), sampler=o.sampler,
        **(_mask_branch(cfg, backbone.out_channels, feature_names) if cfg.mask.enabled else {}))
    roi_heads = BoxHeads(**heads) if o.cascade is None else CascadeHeads(
        later_stages=_later_stages(cfg, backbone.out_channels), iou_thresholds=o.cascade.iou_thresholds, **heads)
    return TwoStageDetector(backbone=backbone, rpn=rpn, roi_heads=roi_heads)


def _later_stages(cfg: ModelConfig, in_channels: int) -> list[CascadeStage]:
    """Cascade stages 2..K: each its own box head, class-agnostic predictor and box coder."""
    o = cfg.roi
    return [CascadeStage(TwoMLPHead(in_channels * o.pool_size ** 2, o.representation_size),
                         AgnosticPredictor(o.representation_size, cfg.num_classes + 1), weights)
            for weights in o.cascade.box_coder_weights[1:]]


def build_loss_weights(cfg: ModelConfig) -> LossWeights:
    """Each term's `weight` and `weight_ramp`; the trainer applies them (losses/weighting.py)."""
    terms = {
        "loss_rpn_cls": TermWeight(cfg.rpn.cls_loss.weight, _ramp(cfg.rpn.cls_loss.weight_ramp)),
        "loss_rpn_box": TermWeight(cfg.rpn.box_loss.weight, _ramp(cfg.rpn.box_loss.weight_ramp)),
        "loss_roi_cls": TermWeight(cfg.roi.cls_loss.weight, _ramp(cfg.roi.cls_loss.weight_ramp)),
        "loss_roi_box": TermWeight(cfg.roi.box_loss.weight, _ramp(cfg.roi.box_loss.weight_ramp)),
    }
    if cfg.roi.cascade is not None:  # each stage's terms: the head's weight (and ramp) times the stage's
        cls, box = terms["loss_roi_cls"], terms["loss_roi_box"]
        for stage, factor in enumerate(cfg.roi.cascade.stage_weights, start=1):
            suffix = "" if stage == 1 else f"_s{stage}"  # stage 1 keeps the one-stage names
            terms[f"loss_roi_cls{suffix}"], terms[f"loss_roi_box{suffix}"] = _scaled(cls, factor), _scaled(box, factor)
    if cfg.mask.enabled:  # the model computes loss_roi_mask only then
        terms["loss_roi_mask"] = TermWeight(cfg.mask.loss.weight, _ramp(cfg.mask.loss.weight_ramp))
    return LossWeights(terms)


def _scaled(term: TermWeight, factor: float) -> TermWeight:
    """A cascade stage's weight: the head's, ramp included, times the stage's."""
    ramp = None if term.ramp is None else Ramp(start=term.ramp.start * factor, iters=term.ramp.iters,
                                               shape=term.ramp.shape)
    return TermWeight(term.weight * factor, ramp)


def _ramp(ramp: WeightRamp | None) -> Ramp | None:
    return None if ramp is None else Ramp(start=ramp.start, iters=ramp.iters, shape=ramp.shape)


def _mask_branch(cfg: ModelConfig, in_channels: int, feature_names: list[str]) -> dict:
    """torchvision's Mask R-CNN head and predictor (so its state dict loads), on our RoIAlign."""
    m = cfg.mask
    predictor = MaskRCNNPredictor(m.conv_channels, m.conv_channels, cfg.num_classes + 1)
    # torchvision's kaiming init starts loss_roi_mask at 3.2-3.3; near-zero logits start it at ln 2
    nn.init.normal_(predictor.mask_fcn_logits.weight, std=0.001)
    nn.init.zeros_(predictor.mask_fcn_logits.bias)
    return {"mask_roi_pool": multi_scale_roi_align(cfg.roi.roi_align, feature_names, m.pool_size, m.sampling_ratio),
            "mask_head": MaskRCNNHeads(in_channels, [m.conv_channels] * m.num_convs, dilation=1),
            "mask_predictor": predictor}


def _init_predictor(predictor: FastRCNNPredictor) -> None:
    """detectron2's init: near-zero logits give CE = ln(C+1) at start, near-zero deltas keep
    the first boxes at the proposals. (nn.Linear's default init starts both far from that.)"""
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)
