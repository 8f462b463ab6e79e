"""The records a COCO file is read into, and the checks of one record at a time.

An ImageRecord is one image with its valid boxes (float32 xyxy [N, 4]) and labels (int64 [N],
1..C). Each kind of bad record has a policy (RecordPolicy, config `data.bad_records`): stop with
an error that names the file and the record, or drop it and count it in a DropReport (never
silently). The vectorized index (coco_index.py) sends here only the records it flags.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from rcnn_trainer.data.coco_file import hashable
from rcnn_trainer.errors import UserError
from rcnn_trainer.input_limits import brief

BORDER_TOLERANCE_PX = 1.0  # boxes this close past the border are clipped without counting
NO_BOXES = np.zeros((0, 4), np.float32)  # shared by the images without objects (items copy them)
NO_LABELS = np.zeros(0, np.int64)
NO_ROWS = np.zeros(0, np.int64)
NO_BOXES.flags.writeable = NO_LABELS.flags.writeable = NO_ROWS.flags.writeable = False


@dataclass(frozen=True)
class RecordPolicy:
    """What to do with each kind of bad record: "error" stops naming it, "drop" counts it
    (box_outside_image may also "clip"). The config's `data.bad_records` (BadRecordPolicy) with the
    same fields and defaults: data/ does not import the config, data.loader.build_dataset maps it here."""

    missing_image: Literal["error", "drop"] = "error"
    unknown_category: Literal["error", "drop"] = "error"
    degenerate_box: Literal["error", "drop"] = "drop"
    non_finite_box: Literal["error", "drop"] = "error"
    box_outside_image: Literal["error", "drop", "clip"] = "clip"
    bad_mask: Literal["error", "drop"] = "drop"
    unsafe_path: Literal["error", "drop"] = "error"

    def __post_init__(self):
        for kind in dataclasses.fields(self):
            allowed = ("error", "drop", "clip") if kind.name == "box_outside_image" else ("error", "drop")
            if getattr(self, kind.name) not in allowed:
                raise ValueError(f"RecordPolicy.{kind.name} must be one of {allowed}, "
                                 f"got {getattr(self, kind.name)!r}")


@dataclass
class DropReport:
    """Counts of what was dropped or fixed while loading, with a few examples of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < 3:
            self.examples[kind].append(example)

    def lines(self) -> list[str]:
        return [f"{kind}: {n} ({'; '.join(self.examples[kind])})" for kind, n in sorted(self.counts.items())]


@dataclass
class ImageRecord:
    image_id: int | str  # as in the file
    file: str  # the image's path; a str because 118,000 Path objects cost ~1 s at indexing
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] xyxy, valid
    labels: np.ndarray  # int64 [N], 1..C
    num_crowd: int = 0
    rows: np.ndarray = field(default_factory=lambda: NO_ROWS)  # int64 [N]: each box's index in 'annotations'

    @property
    def path(self) -> Path:
        return Path(self.file)


@dataclass
class FileBoxes:
    """The file's non-crowd annotations with a finite box, as written (before any check or clip):
    what the preflight judges the file's box format and its per-class counts by."""

    xywh: np.ndarray  # float64 [N, 4]
    labels: np.ndarray  # int64 [N], 0 for a category not in 'categories'
    image_wh: np.ndarray  # float64 [N, 2], inf for an image id not in 'images'


def bbox_from_segmentation(segmentation, image: dict | None = None, ann_file=None, where=None) -> list | None:
    """[x, y, w, h] of a polygon (list of flat coordinate lists) or RLE segmentation; None if
    there is none. With `image` given, a malformed segmentation is a UserError naming the record."""
    if not segmentation:
        return None
    try:
        if isinstance(segmentation, list):
            points = np.asarray([v for poly in segmentation for v in poly], dtype=np.float64).reshape(-1, 2)
            x0, y0 = points.min(axis=0)
            x1, y1 = points.max(axis=0)
            return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
        from pycocotools import mask as mask_utils

        rle = segmentation
        if isinstance(rle.get("counts"), list):
            rle = mask_utils.frPyObjects(rle, *rle["size"])
        return [float(v) for v in mask_utils.toBbox(rle)]
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        if image is None:
            return None
        raise UserError(f"{ann_file}: {where}: has no bbox and its segmentation cannot be read ({err}).") from None


class RecordChecks:
    """The per-record checks of one annotation file, each applying its policy and naming the record
    it judges; drops are counted in `report` (the dataset's, shared)."""

    def __init__(self, ann_file: Path, policy: RecordPolicy, report: DropReport, cat_id_to_label: dict):
        self.ann_file, self.policy, self.report, self.cat_id_to_label = ann_file, policy, report, cat_id_to_label

    def handle(self, kind: str, where: str, problem: str) -> None:
        """Apply the policy for a bad record: raise, or count the drop."""
        if getattr(self.policy, kind) == "error":
            raise UserError(f"{self.ann_file}: {where}: {problem}. To drop such records instead, set "
                            f"data.bad_records.{kind}: drop.")
        self.report.add(kind, where)

    def count_bad_ids(self, ids: list) -> None:
        named = [i for i in ids if i is not None]
        try:
            distinct = len(set(named))
        except TypeError:  # a list or dict as an id
            distinct = len({hashable(i) for i in named})
        if len(ids) - distinct:
            self.report.add("annotation ids renumbered for evaluation",
                            f"{len(ids) - distinct} missing or duplicate ids")

    def images(self, images: list) -> dict:
        """{id: image} of 'images' one by one, the first bad one named in a UserError (the index
        comes here only when some image is not plain)."""
        by_id = {}
        for index, image in enumerate(images):
            where = f"images[{index}]"
            if not isinstance(image, dict) or not {"id", "file_name", "width", "height"} <= image.keys():
                raise UserError(f"{self.ann_file}: {where} needs id, file_name, width and height; got {brief(image)}.")
            if not isinstance(image["file_name"], str) or not image["file_name"]:
                raise UserError(f"{self.ann_file}: {where}: file_name must be a non-empty string, "
                                f"got {brief(image['file_name'])}.")
            for key in ("width", "height"):
                value = image[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
                    raise UserError(f"{self.ann_file}: {where}: {key} must be a positive number of pixels, "
                                    f"got {brief(value)}.")
            if isinstance(image["id"], bool) or not isinstance(image["id"], (int, str)):
                raise UserError(f"{self.ann_file}: {where}: id must be an integer (or a string), "
                                f"got {brief(image['id'])}.")
            key = image["id"]
            if key in by_id:
                raise UserError(f"{self.ann_file}: {where}: duplicate image id {brief(image['id'])}.")
            by_id[key] = image
        return by_id

    def annotation(self, index: int, ann, images: dict, kept_by_image: dict) -> None:
        """The checks of one annotation that need no image size: kept ones are added to
        `kept_by_image[image id]` as (index, annotation), their box checked by `flagged_boxes`."""
        where = f"annotations[{index}] (id {ann.get('id') if isinstance(ann, dict) else '?'})"
        if isinstance(ann, dict) and "bbox" not in ann and ann.get("segmentation") \
                and hashable(ann.get("image_id")) in images:
            ann = dict(ann, bbox=bbox_from_segmentation(ann["segmentation"], images[hashable(ann["image_id"])],
                                                        self.ann_file, where))
            self.report.add("bbox derived from segmentation", where)
        if not isinstance(ann, dict) or not {"image_id", "category_id", "bbox"} <= ann.keys():
            raise UserError(f"{self.ann_file}: {where} needs image_id, category_id and bbox (or a segmentation "
                            f"to derive the box from).")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise UserError(f"{self.ann_file}: {where}: bbox must be 4 numbers [x, y, w, h], got {brief(bbox)}.")
        if not all(math.isfinite(v) for v in bbox):
            self.handle("non_finite_box", where, f"bbox {bbox!r} has non-finite (NaN or infinite) coordinates")
            return
        image_id = hashable(ann["image_id"])
        if image_id not in images:
            self.report.add("unknown_image_id", where)
            return
        if hashable(ann["category_id"]) not in self.cat_id_to_label:
            self.handle("unknown_category", where,
                        f"category_id {brief(ann['category_id'])} is not in 'categories' "
                        f"(known ids: {sorted(self.cat_id_to_label)[:20]})")
            return
        kept_by_image[image_id].append((index, ann))

    def flagged_boxes(self, image: dict, anns: list):
        """(rows, boxes, labels, crowd count) of the flagged annotations of one image, each checked
        with its policy and named."""
        width, height = float(image["width"]), float(image["height"])
        boxes, labels, rows, num_crowd = [], [], [], 0
        for index, ann in sorted(anns, key=lambda pair: pair[0]):
            where = f"annotations[{index}] (id {ann.get('id')}, image '{image['file_name']}')"
            if ann.get("iscrowd", 0):
                num_crowd += 1
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w <= 0 or h <= 0:
                self.handle("degenerate_box", where, f"box [x, y, w, h] = {ann['bbox']} has zero or negative size")
                continue
            box = [x, y, x + w, y + h]
            clipped = [min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
                       min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)]
            overshoot = max(abs(a - b) for a, b in zip(box, clipped))
            if overshoot > BORDER_TOLERANCE_PX:
                outside = (f"box [x, y, w, h] = {ann['bbox']} extends {overshoot:.1f} px outside the "
                           f"{int(width)}x{int(height)} image")
                if self.policy.box_outside_image == "clip":
                    self.report.add("box_outside_image (clipped)", where)
                else:
                    self.handle("box_outside_image", where, outside)
                    continue
            if clipped[2] - clipped[0] < 1e-3 or clipped[3] - clipped[1] < 1e-3:
                self.report.add("box_outside_image (nothing left after clipping)", where)
                continue
            boxes.append(clipped)
            labels.append(self.cat_id_to_label[hashable(ann["category_id"])])
            rows.append(index)
        return (np.asarray(rows, np.int64), np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64), num_crowd)

    def usable_masks(self, records: list[ImageRecord], anns: list, bad_rows: set[int]) -> list[ImageRecord]:
        """The records without the objects whose segmentation gives no mask (bad_mask policy), their
        rows added to `bad_rows`; an error when objects there were and none is left."""
        had_objects = any(len(r.labels) for r in records)
        records = [self._without_bad_masks(r, anns, bad_rows) for r in records]
        if had_objects and not any(len(r.labels) for r in records):
            dropped = self.report.counts["bad_mask"]
            raise UserError(
                f"{self.ann_file}: model.mask.enabled is on but none of its {dropped} objects has a usable "
                f"segmentation ({'; '.join(self.report.examples['bad_mask'][:2])}). Train boxes only with "
                f"model.mask.enabled=false, or add polygons or RLE masks under 'segmentation'.")
        return records

    def _without_bad_masks(self, record: ImageRecord, anns: list, bad_rows: set[int]) -> ImageRecord:
        from rcnn_trainer.data.masks import segmentation_problem

        bad = []
        for k, row in enumerate(record.rows.tolist()):
            segmentation = anns[row].get("segmentation")
            problem = ("it has no segmentation (model.mask.enabled needs one per object)" if not segmentation
                       else segmentation_problem(segmentation, record.height, record.width))
            if problem:
                where = f"annotations[{row}] (id {anns[row].get('id')}, image '{os.path.basename(record.file)}')"
                self.handle("bad_mask", where, problem)
                bad.append(k)
                bad_rows.add(row)
        if not bad:
            return record
        keep = np.setdiff1d(np.arange(len(record.rows)), bad)
        return dataclasses.replace(record, boxes=record.boxes[keep], labels=record.labels[keep],
                                   rows=record.rows[keep])
