"""The config schema: Pydantic models for every section of config.yaml.

Unknown keys are rejected (`extra="forbid"`). Defaults follow torchvision's / detectron2's
Faster R-CNN defaults. Only `build_*(cfg)` functions read these objects; modules take plain
keyword arguments. Loading YAML, `_base_` inheritance and overrides live in config_loader.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rcnn_trainer.config_monitor import (DivergenceLimits, FlatLossLimits, GradientLimits, InitialLossLimits, LearningRateLimits,
                                         LossScaleLimits, LowConfidenceLimits, LrPerImageLimits, ProposalIouLimits,
                                         MaskLearningLimits, OverfittingLimits, PreflightLimits, RegressorCollapseLimits, StarvationLimits, StuckIouLimits,
                                         TrendLimits, WeightRatioLimits)

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _found(path: Path, folder: bool = False) -> bool:
    """Path.is_file / is_dir, but False for a name no file can have (over NAME_MAX), not an OSError."""
    try:
        return path.is_dir() if folder else path.is_file()
    except OSError:
        return False


# --------------------------------------------------------------------------- data
class CocoSplit(Strict):
    ann_file: Path = Field(description="COCO-format annotation json (relative to the working directory).")
    img_dir: Path = Field(description="Folder the `file_name` of each image is relative to.")

    @field_validator("ann_file")
    @classmethod
    def _ann_file_exists(cls, path: Path) -> Path:
        if not _found(path):
            raise ValueError(f"annotation file '{path}' does not exist (resolved: {path.resolve()})")
        return path

    @field_validator("img_dir")
    @classmethod
    def _img_dir_exists(cls, path: Path) -> Path:
        if not _found(path, folder=True):
            raise ValueError(f"image folder '{path}' does not exist (resolved: {path.resolve()})")
        return path


class SyntheticData(Strict):
    num_train: int = Field(200, ge=1, description="Training images to generate.")
    num_val: int = Field(50, ge=1, description="Validation images to generate.")
    image_size: int = Field(128, ge=32, le=2048, description="Side of the square images, in pixels.")
    seed: int = Field(0, description="Generator seed: same seed, same images, byte for byte.")
    cache_dir: Optional[Path] = Field(
        None, description="Where the generated COCO json + PNGs are written once and reused. "
        "Default: $RCNN_TRAINER_CACHE or ~/.cache/rcnn_trainer.")


class BadRecordPolicy(Strict):
    """What to do with each kind of bad annotation record. Dropped records are counted and
    summarised at start; nothing is dropped silently."""

    missing_image: Literal["error", "drop"] = Field(
        "error", description="An image whose file is missing or unreadable.")
    unknown_category: Literal["error", "drop"] = Field(
        "error", description="An annotation whose category_id is not in `categories`.")
    degenerate_box: Literal["error", "drop"] = Field(
        "drop", description="A box with zero or negative width/height (COCO has a few).")
    non_finite_box: Literal["error", "drop"] = Field(
        "error", description="A bbox with NaN or infinite coordinates (a broken export, never a real box).")
    box_outside_image: Literal["error", "drop", "clip"] = Field(
        "clip", description="A box that extends past the image border: clip it to the image "
        "(dropped if nothing is left), drop it, or stop with an error.")
    bad_mask: Literal["error", "drop"] = Field(
        "drop", description="With model.mask.enabled: an object whose segmentation gives no mask (missing, "
        "empty, a polygon of fewer than 3 points, an RLE whose size is not the image's); the object is dropped "
        "with its box.")
    unsafe_path: Literal["error", "drop"] = Field(
        "error", description="An image whose file_name leads outside img_dir (an absolute path, or '..' "
        "that climbs out of it) or holds a NUL: a file name in an annotation file never reads files elsewhere. "
        "Links inside img_dir are followed as usual.")


class DataConfig(Strict):
    train: Optional[CocoSplit] = Field(None, description="Training split (COCO format).")
    val: Optional[CocoSplit] = Field(None, description="Validation split (COCO format).")
    synthetic: Optional[SyntheticData] = Field(
        None, description="Use the built-in synthetic dataset instead of train/val.")
    batch_size: int = Field(2, ge=1, description="Images per batch per process.")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes (0 = main process).")
    min_size: Union[Annotated[int, Field(ge=8)], Annotated[list[Annotated[int, Field(ge=8)]], Field(min_length=1)]] = Field(
        800, description="Resize so the short side is this long ... A list: multi-scale training, one of its sizes "
        "drawn per batch (detectron2's ResizeShortestEdge, choice); evaluation and inference at the largest.")
    max_size: int = Field(1333, ge=8, description="... unless the long side would exceed this.")
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0, description="Horizontal flip probability (train).")
    aspect_ratio_grouping: bool = Field(
        True, description="Batch landscape and portrait images separately (less padding).")
    repeat_factor_threshold: Optional[float] = Field(
        None, gt=0.0, le=1.0, description="Repeat-factor sampling for rare classes (LVIS): an image "
        "whose rarest class is in a fraction f < t of the training images is drawn sqrt(t/f) times "
        "per epoch. null = every image once. LVIS uses 0.001; tens of classes with a long tail: 0.1-0.3.")
    bad_records: BadRecordPolicy = Field(default_factory=BadRecordPolicy)
    max_annotation_mb: float = Field(
        4096, gt=0, description="Largest annotation file read, in MiB (COCO train2017's is 448 MiB; parsing "
        "takes about 10x the file size in memory). A bigger file is refused naming it: raise this for one.")
    check_images: Union[Literal["all"], int] = Field(
        256, description="Image files whose header is read when the dataset is indexed: a seeded sample "
        "of this many, or `all` (118,000 COCO images: ~44 s here, far more on network storage). Every "
        "image is checked anyway when it is first loaded, under bad_records.missing_image.")

    @field_validator("check_images")
    @classmethod
    def _check_images_count(cls, value):
        if isinstance(value, int) and (isinstance(value, bool) or value < 0):
            raise ValueError("data.check_images must be `all` or a count >= 0")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        has_coco = self.train is not None or self.val is not None
        if self.synthetic is not None and has_coco:
            raise ValueError("set either data.synthetic or data.train/data.val, not both")
        if self.synthetic is None and (self.train is None or self.val is None):
            raise ValueError("data needs both data.train and data.val (ann_file, img_dir), "
                             "or data.synthetic for the built-in dataset")
        if self.max_size < self.test_min_size:
            raise ValueError(f"data.max_size ({self.max_size}) must be >= data.min_size ({self.min_size})")
        return self

    @property
    def train_min_sizes(self) -> list[int]:
        return list(self.min_size) if isinstance(self.min_size, list) else [self.min_size]

    @property
    def test_min_size(self) -> int:
        """The short side at evaluation and inference (and for fitting anchors): the largest."""
        return max(self.train_min_sizes)


# --------------------------------------------------------------------------- model
class BackboneConfig(Strict):
    name: Literal["resnet18", "resnet34", "resnet50", "mobilenet_v3_large"] = Field(
        "resnet50", description="torchvision backbone, always with a FeaturePyramidNetwork.")
    weights: Optional[str] = Field(
        None, description="null = random init; 'imagenet' = torchvision's ImageNet weights "
        "(downloaded by torchvision); or the path of a local state dict of the classifier.")
    trainable_layers: int = Field(
        3, ge=0, le=6, description="Backbone stages left trainable, counted from the top "
        "(resnet: 0-5, mobilenet: 0-6). Ignored (all trainable) with weights: null, unless model.init_from "
        "brings trained weights.")
    norm: Literal["frozen_bn", "bn", "gn", "syncbn"] = Field(
        "frozen_bn", description="Backbone normalization. frozen_bn suits pretrained weights (or model.init_from, "
        "whose BatchNorm statistics it keeps); from scratch it is an identity, so those runs need bn or gn.")
    fpn_channels: Union[Literal["auto"], Annotated[int, Field(ge=8)]] = Field(
        256, description="FPN output channels (256 in the literature); auto = sized for the number of classes "
        "(rcnn_trainer/model/head_size.py: 64 below 10 classes, 128 from 10).")

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and value != "imagenet" and not _found(Path(value)):
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


# --------------------------------------------------------------------------- solver
class EMAConfig(Strict):
    enabled: bool = Field(False, description="Keep an exponential moving average of the weights; it is evaluated, "
                          "saved in every checkpoint (`ema`) and used by rcnn-eval and rcnn-predict.")
    decay: float = Field(0.9998, gt=0.0, lt=1.0, description="Its decay once warmed up (YOLOv5 / timm: 0.9998 "
                         "for long runs; about 1 - 10 / max_iters for runs of a few hundred iterations).")
    warmup: int = Field(2000, ge=0, description="The decay ramps as decay x (1 - exp(-updates / warmup)), so the "
                        "average follows the early weights closely (0 = the full decay from the first step).")


class SolverConfig(Strict):
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD (momentum) or AdamW.")
    lr: float = Field(0.02, gt=0.0, description="Base learning rate (0.02 for 16 images with SGD).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    nesterov: bool = Field(False, description="Nesterov momentum (SGD).")
    weight_decay: float = Field(1e-4, ge=0.0, description="L2 / decoupled weight decay.")
    weight_decay_norm_and_bias: bool = Field(False, description="Also decay norm weights and biases.")
    warmup_iters: int = Field(1000, ge=0, description="Linear warmup iterations.")
    warmup_factor: float = Field(0.001, gt=0.0, le=1.0, description="lr multiplier at iteration 0.")
    schedule: Literal["multistep", "cosine", "constant"] = Field("multistep", description="lr after warmup.")
    steps: list[int] = Field(default_factory=list, description="Iterations at which multistep divides lr by 1/gamma.")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="Multistep decay factor.")
    max_iters: int = Field(90000, ge=1, description="Training iterations.")
    max_epochs: Optional[int] = Field(
        None, ge=1, description="If set, train this many passes over the training set instead: max_iters becomes "
        "max_epochs x (training images // global batch). solver.steps stay in iterations.")
    clip_grad_norm: Optional[float] = Field(None, gt=0.0, description="Max total grad norm (null = off).")
    amp: bool = Field(False, description="Mixed precision: fp16 + GradScaler on CUDA, bf16 on CPU.")
    amp_dtype: Literal["auto", "float16", "bfloat16"] = Field(
        "auto", description="Autocast dtype with amp: auto = float16 on CUDA, bfloat16 on CPU (AMX). float16 "
        "always runs with a GradScaler (its overflow steps are skipped and logged as amp_overflow, which is normal).")
    max_nonfinite_steps: int = Field(5, ge=1, description="Stop after this many non-finite steps in a row.")
    ema: EMAConfig = Field(default_factory=EMAConfig)

    @model_validator(mode="after")
    def _steps_in_range(self) -> "SolverConfig":
        if sorted(self.steps) != self.steps:
            raise ValueError(f"solver.steps must be increasing, got {self.steps}")
        if self.steps and self.steps[-1] >= self.max_iters:
            raise ValueError(f"solver.steps {self.steps} must be < solver.max_iters ({self.max_iters})")
        return self


class TrainConfig(Strict):
    log_period: int = Field(20, ge=1, description="Iterations between log lines.")
    eval_period: int = Field(0, ge=0, description="Iterations between evaluations (0 = only at the end).")
    checkpoint_period: int = Field(1000, ge=1, description="Iterations between checkpoints.")
    keep_checkpoints: int = Field(3, ge=1, description="Newest periodic checkpoints kept on disk.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (null = torch default).")
    channels_last: Union[bool, Literal["auto"]] = Field(
        "auto", description="NHWC memory layout for images, activations and conv weights. auto = on with "
        "autocast (bf16 on an AMX/AVX512-BF16 CPU, fp16 on CUDA), off in fp32 (NHWC measured 5% slower in fp32 "
        "on an AVX2 CPU).")
    compile: bool = Field(
        False, description="torch.compile (inductor) of the backbone + FPN, in place (checkpoints unchanged). "
        "Measured on a 2-core AVX512 CPU: compiling cost 15-41 s and saved nothing (training 0.42 vs 0.33 s/step "
        "eager, inference 0.158 vs 0.152): off; figures in docs/benchmarks.md, tools/compile_bench.py.")
    data_timeout_s: int = Field(
        300, ge=0, description="Watchdog: stop (exit 1, saying where it waited, after saving a checkpoint) when no "
        "training batch arrives for this many seconds; 0 = wait forever.")


class CollapseConfig(Strict):
    patience: int = Field(3, ge=1, description="Checks in a row below min_ratio before the alarm.")
    min_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Detections/GT per image below this = collapsed.")
    drop: float = Field(0.9, gt=0.0, lt=1.0, description="Also collapsed: this fraction below the peak for patience "
                        "checks in a row ...")
    settle_ratio: float = Field(2.0, gt=1.0, description="... the peak counted from the first check with at most "
                                "this x GT detections per image (falling from the near-uniform early scores is "
                                "learning, not collapse).")
    action: Literal["warn", "stop"] = Field("warn", description="warn, or stop training.")


class MonitorConfig(Strict):
    score_thresholds: list[float] = Field(
        default_factory=lambda: [0.05, 0.3, 0.5, 0.7], description="Score thresholds of the count table.")
    period: Union[Literal["auto"], int] = Field(
        "auto", description="Iterations between monitor judgments (probe inference + every check); auto = "
        "max_iters / 20, at least 10 and at most 500, so every run gets about 20 judgments and a failing run "
        "is named within its first third.")
    dashboard_every: int = Field(5, ge=1, description="Print the dashboard block every this many judgments "
                                 "(and at the last one, and whenever an alarm fires).")
    probe_images: int = Field(8, ge=1, description="Training images the dashboard runs inference on.")
    collapse: CollapseConfig = Field(default_factory=CollapseConfig)
    dominant_share: float = Field(0.7, gt=0.0, le=1.0, description="Alarm when one weighted term is above this share of the total ...")
    sustain: int = Field(3, ge=1, description="... for this many monitor periods in a row (also foreground starvation, stuck IoU loss).")
    flat_window: int = Field(5, ge=3, description="Monitor periods over which a loss term's trend is judged flat.")
    repeat_every: int = Field(5, ge=1, description="A repeated alarm is summarised in one line until this many checks have passed.")
    # what each check compares against (config_monitor.py; measured reasons in docs/monitor.md)
    initial_loss: InitialLossLimits = Field(default_factory=InitialLossLimits)
    weight_ratio: WeightRatioLimits = Field(default_factory=WeightRatioLimits)
    flat_loss: FlatLossLimits = Field(default_factory=FlatLossLimits)
    stuck_iou: StuckIouLimits = Field(default_factory=StuckIouLimits)
    starvation: StarvationLimits = Field(default_factory=StarvationLimits)
    proposal_iou: ProposalIouLimits = Field(default_factory=ProposalIouLimits)
    low_confidence: LowConfidenceLimits = Field(default_factory=LowConfidenceLimits)
    regressor_collapse: RegressorCollapseLimits = Field(default_factory=RegressorCollapseLimits)
    mask_learning: MaskLearningLimits = Field(default_factory=MaskLearningLimits)
    overfitting: OverfittingLimits = Field(default_factory=OverfittingLimits)
    learning_rate: LearningRateLimits = Field(default_factory=LearningRateLimits)
    lr_per_image: LrPerImageLimits = Field(default_factory=LrPerImageLimits)
    gradients: GradientLimits = Field(default_factory=GradientLimits)
    loss_scale: LossScaleLimits = Field(default_factory=LossScaleLimits)
    preflight: PreflightLimits = Field(default_factory=PreflightLimits)
    divergence: DivergenceLimits = Field(default_factory=DivergenceLimits)
    trend: TrendLimits = Field(default_factory=TrendLimits)

    @field_validator("period")
    @classmethod
    def _positive_period(cls, value):
        if value != "auto" and value < 1:
            raise ValueError(f"monitor.period must be >= 1 or auto, got {value}")
        return value

    def period_for(self, max_iters: int) -> int:
        if self.period != "auto":
            return self.period
        return max(10, min(500, max_iters // 20))

    @field_validator("score_thresholds")
    @classmethod
    def _sorted_thresholds(cls, values: list[float]) -> list[float]:
        if not values:
            raise ValueError("monitor.score_thresholds needs at least one threshold")
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"monitor.score_thresholds must lie in [0, 1], got {values}")
        if sorted(values) != values:
            raise ValueError(f"monitor.score_thresholds must be sorted ascending, got {values}")
        return values


class TTAConfig(Strict):
    min_sizes: list[Annotated[int, Field(ge=8)]] = Field(
        default_factory=list, description="Short sides run besides data.min_size's evaluation size with --tta "
        "(e.g. [96, 160] around 128); [] = that size only.")
    flip: Union[bool, Literal["auto"]] = Field(
        "auto", description="Also run each size mirrored; auto = when training flipped (data.hflip_prob > 0), "
        "i.e. when the classes are left-right symmetric.")
    nms_thresh: Optional[float] = Field(None, ge=0.0, le=1.0, description="IoU of the per-class NMS that merges "
                                        "the passes (null = model.roi.nms_thresh).")


class Config(Strict):
    seed: int = Field(42, description="Seed for python, numpy, torch and the data order.")
    output_dir: Path = Field(Path("output"), description="Run folder: config, metrics.jsonl, checkpoints.")
    data: DataConfig
    model: ModelConfig
    solver: SolverConfig = Field(default_factory=SolverConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    tta: TTAConfig = Field(default_factory=TTAConfig)

    def with_settings(self, updates: dict) -> "Config":
        """A new, validated config with the dotted keys of `updates` set ("model.num_classes": 3);
        this one is left as it is (the user's config is never changed after validation)."""
        data = self.model_dump(mode="json")
        for dotted, value in updates.items():
            *sections, name = dotted.split(".")
            node = data
            for section in sections:
                node = node[section]
            node[name] = value
        return type(self).model_validate(data)

