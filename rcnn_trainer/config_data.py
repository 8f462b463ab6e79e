"""The `data:` section of config.yaml: the splits (or the synthetic dataset), resizing and
batching, and what to do with each kind of bad annotation record."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from rcnn_trainer.config_base import Strict, found_on_disk


class CocoSplit(Strict):
    ann_file: Path = Field(description="COCO-format annotation json (relative to the working directory).")
    img_dir: Path = Field(description="Folder the `file_name` of each image is relative to.")

    @field_validator("ann_file")
    @classmethod
    def _ann_file_exists(cls, path: Path) -> Path:
        if not found_on_disk(path):
            raise ValueError(f"annotation file '{path}' does not exist (resolved: {path.resolve()})")
        return path

    @field_validator("img_dir")
    @classmethod
    def _img_dir_exists(cls, path: Path) -> Path:
        if not found_on_disk(path, folder=True):
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

