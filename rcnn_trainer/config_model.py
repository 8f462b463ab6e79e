"""The `model:` section of config.yaml: backbone + FPN, anchors, the RPN and RoI heads with their
losses, the mask head, and the settings that may be `auto` (resolved from the data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from rcnn_trainer.config_base import Strict, found_on_disk


class BackboneConfig(Strict):
    name: Literal["resnet18", "resnet34", "resnet50", "mobilenet_v3_large", "resnext50_32x4d", "regnet_y_400mf",
                  "regnet_y_800mf", "regnet_y_1_6gf", "convnext_tiny", "swin_t"] = Field(
        "resnet50", description="torchvision backbone, always with a FeaturePyramidNetwork on its four stages "
        "(strides 4-32; mobilenet: two); stages, norms and freezing per family in docs/backbones.md.")
    weights: Optional[str] = Field(
        None, description="null = random init; 'imagenet' = torchvision's ImageNet weights "
        "(downloaded by torchvision); or the path of a local state dict of the classifier.")
    trainable_layers: int = Field(
        3, ge=0, le=6, description="Backbone stages left trainable, counted from the top "
        "(resnet, resnext, regnet, convnext, swin: 0-5, the stem counted last; mobilenet: 0-6). Ignored "
        "(all trainable) with weights: null, unless model.init_from brings trained weights.")
    norm: Literal["frozen_bn", "bn", "gn", "syncbn"] = Field(
        "frozen_bn", description="Backbone BatchNorm (convnext and swin use LayerNorm, which this leaves alone). "
        "frozen_bn suits pretrained weights (or model.init_from, "
        "whose BatchNorm statistics it keeps); from scratch it is an identity, so those runs need bn or gn.")
    fpn_channels: Union[Literal["auto"], Annotated[int, Field(ge=8)]] = Field(
        256, description="FPN output channels (256 in the literature); auto = sized for the number of classes "
        "(rcnn_trainer/data/head_size.py: 64 below 10 classes, 128 from 10).")

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value != "imagenet" and not found_on_disk(Path(value)):
            raise ValueError(f"weights file '{value}' does not exist; use null, 'imagenet' or a file path")
        return value


class AnchorConfig(Strict):
    sizes: Union[Literal["auto"], list[list[float]]] = Field(
        "auto", description="Anchor sizes (pixels, after resize), one list per FPN level (P2..P6), e.g. "
        "torchvision's [[32], [64], [128], [256], [512]]; auto = octave-spaced sizes fitted to the training "
        "boxes after resize (printed at start with the coverage they reach; the run folder's config.yaml "
        "holds the numbers).")
    aspect_ratios: list[float] = Field(
        default_factory=lambda: [0.5, 1.0, 2.0], description="Height/width ratios at every level.")

    @field_validator("sizes")
    @classmethod
    def _positive_sizes(cls, sizes):
        if sizes == "auto":
            return sizes
        if not sizes or any(not level or min(level) <= 0 for level in sizes):
            raise ValueError("every FPN level needs at least one anchor size > 0")
        return sizes


class WeightRamp(Strict):
    """Ramp a loss weight from `start` to the term's `weight` over the first `iters` iterations."""

    start: float = Field(ge=0.0, description="Weight at iteration 0.")
    iters: int = Field(ge=1, description="Iterations to reach the final weight.")
    shape: Literal["linear", "cosine"] = Field("linear", description="Ramp shape.")


class ClsLossConfig(Strict):
    type: str = Field(description="rpn: bce | focal; roi: ce | focal.")
    weight: float = Field(1.0, ge=0.0, description="Weight of this term in the total loss.")
    weight_ramp: Optional[WeightRamp] = Field(None, description="Ramp the weight up (or down) at the start.")
    alpha: float = Field(0.25, ge=0.0, le=1.0, description="Focal loss alpha (rpn focal only).")
    gamma: float = Field(2.0, ge=0.0, description="Focal loss gamma (0 = plain cross-entropy).")
    avg_factor: Literal["sampled", "positives"] = Field(
        "sampled", description="Divide the summed loss by the number of sampled anchors/RoIs "
        "(torchvision/detectron2) or by the number of positives (usual with focal loss).")
    logit_adjust: float = Field(
        0.0, ge=0.0, description="RoI only: tau of the logit-adjusted loss (Menon et al. 2021) for long-tailed "
        "classes: in the loss, each foreground class's logit gets tau x log(n_c / n_max), n_c its training objects "
        "(as the sampler draws them), so the frequent classes' samples push the rare ones down less and rare "
        "classes score higher at test; 0 = off (torchvision's loss).")


class BoxLossConfig(Strict):
    type: Literal["smooth_l1", "l1", "giou", "diou", "ciou", "wiou"] = Field(
        "smooth_l1", description="smooth_l1 / l1 on encoded deltas, or an IoU loss on decoded boxes "
        "(wiou = Wise-IoU v3 with a running mean of the IoU loss).")
    weight: float = Field(1.0, ge=0.0, description="Weight of this term in the total loss.")
    weight_ramp: Optional[WeightRamp] = Field(None, description="Ramp the weight up (or down) at the start.")
    wiou_alpha: float = Field(1.9, gt=0.0, description="Wise-IoU v3 focusing alpha.")
    wiou_delta: float = Field(3.0, gt=0.0, description="Wise-IoU v3 focusing delta.")
    wiou_momentum: float = Field(0.01, gt=0.0, le=1.0, description="Wise-IoU running-mean momentum.")
    beta: float = Field(1.0 / 9.0, ge=0.0, description="Smooth L1 transition point (1/9 in torchvision).")
    avg_factor: Literal["sampled", "positives"] = Field(
        "sampled", description="Divide by the number of sampled anchors/RoIs (torchvision) or of positives.")


def _cls_loss(loss, handler, head: str, types: tuple[str, str]) -> ClsLossConfig:
    """model.<head>.cls_loss: `type` defaults to the head's own (types[0]), so that
    `model.rpn.cls_loss.gamma=3` alone keeps it, and must be one of the losses the head computes."""
    if isinstance(loss, dict) and "type" not in loss:
        loss = {"type": types[0], **loss}
    loss = handler(loss)
    if loss.type not in types:
        raise ValueError(f"{head}.cls_loss.type must be '{types[0]}' or '{types[1]}', got '{loss.type}'")
    if head == "rpn" and loss.logit_adjust:
        raise ValueError("rpn.cls_loss.logit_adjust: the RPN has one class (objectness); set it on model.roi")
    return loss


def _check_iou_order(section, name: str):
    if section.bg_iou_thresh > section.fg_iou_thresh:
        raise ValueError(f"{name}.bg_iou_thresh ({section.bg_iou_thresh}) must be <= "
                         f"{name}.fg_iou_thresh ({section.fg_iou_thresh})")
    return section


class RPNConfig(Strict):
    fg_iou_thresh: float = Field(0.7, ge=0.0, le=1.0, description="Anchor IoU >= this: foreground.")
    bg_iou_thresh: float = Field(0.3, ge=0.0, le=1.0, description="Anchor IoU < this: background.")
    batch_size_per_image: int = Field(256, ge=1, description="Anchors sampled per image for the loss.")
    positive_fraction: float = Field(0.5, gt=0.0, le=1.0, description="Target share of positives in the sample.")
    pre_nms_top_n_train: int = Field(2000, ge=1, description="Top proposals per level before NMS (train).")
    post_nms_top_n_train: int = Field(2000, ge=1, description="Proposals kept per image after NMS (train).")
    pre_nms_top_n_test: int = Field(1000, ge=1, description="Top proposals per level before NMS (test).")
    post_nms_top_n_test: int = Field(1000, ge=1, description="Proposals kept per image after NMS (test).")
    nms_thresh: float = Field(0.7, ge=0.0, le=1.0, description="Proposal NMS IoU threshold.")
    score_thresh: float = Field(0.0, ge=0.0, le=1.0, description="Drop proposals below this objectness.")
    cls_pos_weight: float = Field(1.0, gt=0.0, description="BCE pos_weight of foreground anchors (1-10).")
    cls_loss: ClsLossConfig = Field(default_factory=lambda: ClsLossConfig(type="bce"))
    box_loss: BoxLossConfig = Field(default_factory=BoxLossConfig)

    @field_validator("cls_loss", mode="wrap")
    @classmethod
    def _head_cls_loss(cls, loss, handler) -> ClsLossConfig:
        return _cls_loss(loss, handler, "rpn", ("bce", "focal"))

    @model_validator(mode="after")
    def _iou_order(self) -> "RPNConfig":
        return _check_iou_order(self, "rpn")


MAX_CASCADE_STAGES = 6  # losses/weighting.py names the stage terms up to this many


class CascadeConfig(Strict):
    """Cascade R-CNN (Cai & Vasconcelos 2018): RoI stages that each refine the previous stage's
    boxes and train at a stricter IoU; detectron2's and MMDetection's defaults."""

    stages: int = Field(3, ge=2, le=MAX_CASCADE_STAGES, description="RoI stages (3 in the paper); every list "
                        "below has one entry per stage.")
    iou_thresholds: list[float] = Field(
        default_factory=lambda: [0.5, 0.6, 0.7], description="Foreground IoU of each stage (non-decreasing: each "
        "stage sees the previous stage's better boxes); replaces roi.fg_iou_thresh / bg_iou_thresh.")
    stage_weights: list[float] = Field(
        default_factory=lambda: [1.0, 0.5, 0.25], description="Each stage's loss weight, times roi.cls_loss.weight "
        "and roi.box_loss.weight (MMDetection's 1 / 0.5 / 0.25).")
    box_coder_weights: list[list[float]] = Field(
        default_factory=lambda: [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0], [30.0, 30.0, 15.0, 15.0]],
        description="(wx, wy, ww, wh) of each stage's class-agnostic box coder: larger for later stages, whose "
        "deltas are smaller (detectron2's 10 / 20 / 30); replaces roi.bbox_reg_weights.")

    @model_validator(mode="after")
    def _per_stage(self) -> "CascadeConfig":
        for name in ("iou_thresholds", "stage_weights", "box_coder_weights"):
            values = getattr(self, name)
            if len(values) != self.stages:
                raise ValueError(f"model.roi.cascade.{name} has {len(values)} entries but model.roi.cascade.stages "
                                 f"is {self.stages}: give one per stage")
        ious = self.iou_thresholds
        if any(not 0.0 < t < 1.0 for t in ious) or any(b < a for a, b in zip(ious, ious[1:])):
            raise ValueError(f"model.roi.cascade.iou_thresholds must be non-decreasing values in (0, 1), got {ious}: "
                             f"each stage trains on the previous stage's refined boxes at a stricter IoU")
        if any(w < 0 for w in self.stage_weights):
            raise ValueError(f"model.roi.cascade.stage_weights must be >= 0, got {self.stage_weights}")
        if any(len(w) != 4 or min(w) <= 0 for w in self.box_coder_weights):
            raise ValueError(f"model.roi.cascade.box_coder_weights needs 4 positive numbers (wx, wy, ww, wh) per "
                             f"stage, got {self.box_coder_weights}")
        return self


class ROIConfig(Strict):
    fg_iou_thresh: float = Field(0.5, ge=0.0, le=1.0, description="RoI IoU >= this: foreground.")
    bg_iou_thresh: float = Field(0.5, ge=0.0, le=1.0, description="RoI IoU < this: background.")
    batch_size_per_image: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = Field(
        512, description="RoIs sampled per image for the loss; auto = sized for the number of classes "
        "(64 below 10 classes, 128 from 10).")
    positive_fraction: float = Field(0.25, gt=0.0, le=1.0, description="Target share of positive RoIs.")
    cls_pos_weight: float = Field(1.0, gt=0.0, description="CE weight of every foreground class vs background (1.0).")
    sampler: Literal["random", "ohem"] = Field(
        "random", description="random (torchvision) or ohem: the highest-loss RoIs of each image, with the same "
        "positive_fraction and batch_size_per_image (costs a no-grad head pass over all proposals).")
    cls_loss: ClsLossConfig = Field(default_factory=lambda: ClsLossConfig(type="ce"))
    box_loss: BoxLossConfig = Field(default_factory=BoxLossConfig)
    bbox_reg_weights: list[float] = Field(
        default_factory=lambda: [10.0, 10.0, 5.0, 5.0], description="Box coder weights (wx, wy, ww, wh).")
    representation_size: Union[Literal["auto"], Annotated[int, Field(ge=8)]] = Field(
        1024, description="Width of the two-FC box head; auto = sized for the number of classes "
        "(256 below 10 classes, 1024 from 10).")
    pool_size: int = Field(7, ge=1, description="RoIAlign output size.")
    sampling_ratio: int = Field(2, ge=0, description="RoIAlign sampling points per bin (0 = adaptive).")
    roi_align: Literal["auto", "torchvision"] = Field(
        "auto", description="auto: RoIAlign as one sparse matrix product on CPU (multi-threaded, same numbers "
        "as torchvision's op, ~9x faster forward+backward here) when training on CPU, torchvision's kernel on GPU "
        "and for inference (faster without a backward to share the matrix with); "
        "torchvision: torchvision's kernel everywhere.")
    score_thresh: float = Field(0.05, ge=0.0, le=1.0, description="Drop detections below this score.")
    nms_thresh: float = Field(0.5, ge=0.0, le=1.0, description="Per-class NMS IoU threshold.")
    detections_per_img: int = Field(100, ge=1, description="Detections kept per image.")
    cascade: Optional[CascadeConfig] = Field(
        None, description="null = one RoI stage; {} = Cascade R-CNN with detectron2's defaults (3 stages at IoU "
        "0.5 / 0.6 / 0.7, class-agnostic boxes, scores averaged over the stages at inference; docs/cascade.md).")

    @field_validator("cls_loss", mode="wrap")
    @classmethod
    def _head_cls_loss(cls, loss, handler) -> ClsLossConfig:
        return _cls_loss(loss, handler, "roi", ("ce", "focal"))

    @field_validator("bbox_reg_weights")
    @classmethod
    def _four_weights(cls, weights: list[float]) -> list[float]:
        if len(weights) != 4 or min(weights) <= 0:
            raise ValueError("roi.bbox_reg_weights needs 4 positive numbers (wx, wy, ww, wh)")
        return weights

    @model_validator(mode="after")
    def _iou_order(self) -> "ROIConfig":
        return _check_iou_order(self, "roi")


class MaskLossConfig(Strict):
    weight: float = Field(1.0, ge=0.0, description="Weight of loss_roi_mask in the total loss.")
    weight_ramp: Optional[WeightRamp] = Field(None, description="Ramp the weight up (or down) at the start.")


class MaskConfig(Strict):
    enabled: bool = Field(False, description="Train and predict instance masks (Mask R-CNN) from the COCO "
                          "`segmentation` of each object (polygons or RLE).")
    pool_size: int = Field(14, ge=2, description="RoIAlign output of the mask branch; its masks are 2x this "
                           "(28 x 28 at 14, as torchvision and detectron2).")
    sampling_ratio: int = Field(2, ge=0, description="RoIAlign sampling points per bin (0 = adaptive).")
    num_convs: Union[Literal["auto"], Annotated[int, Field(ge=1)]] = Field(
        4, description="3x3 convs before the upsampling (torchvision: 4); auto = sized for the number of "
        "classes like the box head (2 below 10 classes, 4 from 10).")
    conv_channels: Union[Literal["auto"], Annotated[int, Field(ge=8)]] = Field(
        256, description="Width of those convs (torchvision: 256); auto = 64 below 10 classes, 256 from 10.")
    loss: MaskLossConfig = Field(default_factory=MaskLossConfig)


class ModelConfig(Strict):
    num_classes: Union[Literal["auto"], int] = Field(
        "auto", description="Foreground classes (background is added by the model); auto = the number of "
        "categories in the training annotation file. An explicit number that disagrees with the file is an error.")
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    anchors: AnchorConfig = Field(default_factory=AnchorConfig)
    rpn: RPNConfig = Field(default_factory=RPNConfig)
    roi: ROIConfig = Field(default_factory=ROIConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    init_from: Optional[str] = Field(
        None, description="Start a new run from this file: an rcnn_trainer checkpoint or a torchvision FasterRCNN / "
        "MaskRCNN state dict. Tensors whose name and shape match are loaded, the rest (e.g. the class-dependent "
        "predictor layers when the class count differs) keep their init; the log names both. --resume still "
        "continues a run from its own checkpoint.")

    @model_validator(mode="after")
    def _anchor_levels(self) -> "ModelConfig":
        if isinstance(self.num_classes, int) and self.num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1 or auto, got {self.num_classes}")
        if self.anchors.sizes != "auto" and len(self.anchors.sizes) != self.num_levels:
            raise ValueError(f"model.anchors.sizes has {len(self.anchors.sizes)} levels but the "
                             f"{self.backbone.name} FPN has {self.num_levels}; give one list per level")
        return self

    @property
    def num_levels(self) -> int:
        """FPN levels with anchors: 4 backbone levels + a max-pool level for resnets, 3 for mobilenet."""
        return 3 if self.backbone.name.startswith("mobilenet") else 5

    # the settings that may be `auto` (resolved from the data before the model is built)
    AUTO_SETTINGS: ClassVar[tuple[str, ...]] = ("num_classes", "anchors.sizes", "backbone.fpn_channels",
                                              "roi.representation_size",
                                              "roi.batch_size_per_image", "mask.num_convs",
                                              "mask.conv_channels")

    def setting(self, dotted: str):
        section, _, name = dotted.rpartition(".")
        return getattr(getattr(self, section) if section else self, name)

    def unresolved(self) -> list[str]:
        """The AUTO_SETTINGS still at `auto` (the mask head's only when it is on)."""
        return [key for key in self.AUTO_SETTINGS if self.setting(key) == "auto"
                and (self.mask.enabled or not key.startswith("mask."))]

