"""The `data:` section of config.yaml: the splits (or the synthetic dataset), resizing and
batching, and what to do with each kind of bad annotation record."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from rcnn_trainer.config_base import Strict, found_on_disk


class CocoSplit(Strict):
    """One split's labels: a COCO json, or VOC / YOLO / LabelMe labels (docs/formats.md)."""

    ann_file: Path = Field(description="The labels (relative to the working directory): a COCO json, a VOC "
                           "Annotations folder, .xml or ImageSets/Main/<split>.txt id list, a YOLO dataset yaml or "
                           "labels folder, or a LabelMe folder.")
    img_dir: Optional[Path] = Field(None, description="Folder the images' file names are relative to (required, "
                                    "except with a YOLO dataset yaml, where it defaults to the yaml's `path`).")
    format: Literal["auto", "coco", "voc", "yolo", "labelme"] = Field(
        "auto", description="Label format of ann_file. auto: by content (a .json -> coco, a .xml, a .txt id list or "
        "a folder of .xml -> voc, a .yaml or a folder of .txt -> yolo, a folder of .json -> labelme).")

    @field_validator("ann_file")
    @classmethod
    def _ann_file_exists(cls, path: Path) -> Path:
        if not (found_on_disk(path) or found_on_disk(path, folder=True)):
            raise ValueError(f"annotation file '{path}' does not exist (resolved: {path.resolve()})")
        return path

    @field_validator("img_dir")
    @classmethod
    def _img_dir_exists(cls, path: Optional[Path]) -> Optional[Path]:
        if path is not None and not found_on_disk(path, folder=True):
            raise ValueError(f"image folder '{path}' does not exist (resolved: {path.resolve()})")
        return path

    @model_validator(mode="after")
    def _img_dir_needed(self) -> "CocoSplit":
        if self.img_dir is None and self.ann_file.suffix.lower() not in (".yaml", ".yml"):
            raise ValueError(f"img_dir is required with ann_file '{self.ann_file}' (only a YOLO dataset yaml "
                             f"names its images itself)")
        return self


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


class TilingConfig(Strict):
    """Training on tiles of large images and sliced inference (data/tiling.py, infer/sliced.py)."""

    size: int = Field(512, ge=32, description="Side of a square tile, in original image pixels. Images whose "
                      "sides are both <= size are used whole. Pick it so that the objects keep >= ~16 px after "
                      "the resize rule (min_size/max_size) applied to a tile; usually min_size = size.")
    overlap: float = Field(0.2, ge=0.0, lt=1.0, description="Fraction of `size` two neighbouring tiles share "
                           "(SAHI's default 0.2): an object up to overlap x size across lies whole in some tile.")
    min_visible: float = Field(0.5, gt=0.0, le=1.0, description="Training: a box cut by a tile border is a "
                               "ground-truth box there when at least this fraction of its area is inside the tile; "
                               "less, and what is inside is an ignore region (anchors and RoIs overlapping it are "
                               "neither positives nor negatives).")
    empty_share: float = Field(0.3, ge=0.0, le=1.0, description="Training: each tile without objects is drawn "
                               "in an epoch with this probability (seeded by seed and epoch): some negatives "
                               "without spending most of the budget on background. 1.0 = every tile.")
    whole_image: bool = Field(True, description="Also use each large image whole (resized by min_size/max_size): "
                              "as one more training item per epoch, and as one more view merged at inference "
                              "(the large objects that no tile holds whole).")
    merge: Literal["greedy", "nms"] = Field("nms", description="Inference: how detections of overlapping "
                                            "tiles merge: `greedy` joins same-class boxes whose intersection "
                                            "covers >= merge_thresh of the smaller one into their union (SAHI's "
                                            "greedy NMM: a box cut at a tile edge rejoins its other part); `nms` is "
                                            "per-class NMS at model.roi.nms_thresh (measured: docs/tiling.md).")
    merge_thresh: float = Field(0.5, gt=0.0, le=1.0, description="Inference, merge=greedy: intersection over "
                                "the smaller box at which two same-class boxes are one object.")
    max_image_megapixels: float = Field(250.0, gt=0.0, description="With tiling on, images up to this many "
                                        "megapixels are decoded (PIL's own limit is ~89; a 10000 x 10000 image "
                                        "is 100 and takes ~300 MB as RGB). Larger ones are refused as "
                                        "decompression bombs.")


class ColorJitterConfig(Strict):
    """Photometric jitter (torchvision's ColorJitter factors); boxes and masks are untouched."""

    brightness: float = Field(0.0, ge=0.0, description="Brightness factor drawn from [1 - b, 1 + b].")
    contrast: float = Field(0.0, ge=0.0, description="Contrast factor drawn from [1 - c, 1 + c].")
    saturation: float = Field(0.0, ge=0.0, description="Saturation factor drawn from [1 - s, 1 + s].")
    hue: float = Field(0.0, ge=0.0, le=0.5, description="Hue shift drawn from [-h, h] (a fraction of the colour "
                       "wheel; 0.5 = half way round).")


class AugmentConfig(Strict):
    """Training augmentations beyond data.hflip_prob and the min_size list (data/augment.py). All off by
    default; each is drawn from (seed, epoch, index, copy) like the flip, so a resumed run is exact."""

    vflip_prob: float = Field(0.0, ge=0.0, le=1.0, description="Vertical flip probability (aerial, microscopy: "
                              "no up or down; not for digits or text).")
    rot90_prob: float = Field(0.0, ge=0.0, le=1.0, description="Probability of a rotation by 90, 180 or 270 "
                              "degrees (drawn evenly); a non-square image swaps its sides.")
    color_jitter: Optional[ColorJitterConfig] = Field(
        None, description="null = off; e.g. {brightness: 0.2, contrast: 0.2, saturation: 0.2, hue: 0.02}, "
        "applied in a random order as torchvision's ColorJitter does.")
    scale_jitter: Optional[tuple[float, float]] = Field(
        None, description="null = off; [lo, hi]: each training image's resize scale (from min_size/max_size, "
        "the list's size included) times a factor drawn from [lo, hi], max_size scaled alike (e.g. [0.75, 1.25]; "
        "above 1 images pass max_size: memory grows with hi squared).")

    @field_validator("scale_jitter")
    @classmethod
    def _ordered_range(cls, value):
        if value is not None and not 0.0 < value[0] <= value[1] <= 4.0:
            raise ValueError(f"data.augment.scale_jitter must be [lo, hi] with 0 < lo <= hi <= 4, got {list(value)}")
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.vflip_prob or self.rot90_prob or self.color_jitter is not None
                    or self.scale_jitter is not None)


class DataConfig(Strict):
    train: Optional[CocoSplit] = Field(None, description="Training split (COCO, VOC, YOLO or LabelMe labels).")
    val: Optional[CocoSplit] = Field(None, description="Validation split (COCO, VOC, YOLO or LabelMe labels).")
    synthetic: Optional[SyntheticData] = Field(
        None, description="Use the built-in synthetic dataset instead of train/val.")
    batch_size: int = Field(2, ge=1, description="Images per batch per process.")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes (0 = main process).")
    min_size: Union[Annotated[int, Field(ge=8)], Annotated[list[Annotated[int, Field(ge=8)]], Field(min_length=1)]] = Field(
        800, description="Resize so the short side is this long ... A list: multi-scale training, one of its sizes "
        "drawn per batch (detectron2's ResizeShortestEdge, choice); evaluation and inference at the largest.")
    max_size: int = Field(1333, ge=8, description="... unless the long side would exceed this.")
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0, description="Horizontal flip probability (train).")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="More training augmentations (vertical flip, 90-degree rotations, colour and scale jitter; docs/augment.md). Off by default.")
    aspect_ratio_grouping: bool = Field(
        True, description="Batch landscape and portrait images separately (less padding).")
    repeat_factor_threshold: Optional[float] = Field(
        None, gt=0.0, le=1.0, description="Repeat-factor sampling for rare classes (LVIS): an image "
        "whose rarest class is in a fraction f < t of the training images is drawn sqrt(t/f) times "
        "per epoch. null = every image once. LVIS uses 0.001; tens of classes with a long tail: 0.1-0.3.")
    bad_records: BadRecordPolicy = Field(default_factory=BadRecordPolicy)
    tiling: Optional[TilingConfig] = Field(
        None, description="null: images are resized whole. Set (e.g. {size: 512, overlap: 0.2}) for images far "
        "larger than max_size with small objects: training draws tiles, rcnn-eval / rcnn-predict slice, merge and "
        "report original pixels (docs/tiling.md).")
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

