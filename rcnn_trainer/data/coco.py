"""COCO-format detection dataset with record checks.

Targets follow torchvision: {"boxes": float32 xyxy [N, 4], "labels": int64 [N]} with labels
in 1..C (0 is background), plus "image_id" (the file's id: an int or a str, 1 and "1" being two
images) and "orig_size" (h, w). pycocotools is handed an integer per image instead
(`coco_image_ids`, `coco_api`, `results_for_coco`); what we write for people keeps the file's ids.
A file_name is a path under img_dir: one that leads outside it is a bad record (unsafe_path).
Category ids are mapped to contiguous labels; `label_to_cat_id` maps predictions back.
Crowd annotations are left out of training targets (COCO evaluation ignores detections that
fall on them, using the original annotation file). Images without objects stay as negatives.

Each kind of bad record has a policy (config `data.bad_records`): stop with an error that
names the file and record, or drop it and count it in `report` (never silently).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import io
import json
import math
import os
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rcnn_trainer.data.pixels import read_rgb
from rcnn_trainer.data.transforms import ToTensor, output_size
from rcnn_trainer.errors import UserError
from rcnn_trainer.input_limits import MAX_JSON_DEPTH, brief, check_nesting

BORDER_TOLERANCE_PX = 1.0  # boxes this close past the border are clipped without counting
_NO_BOXES = np.zeros((0, 4), np.float32)  # shared by the images without objects (items copy them)
_NO_LABELS = np.zeros(0, np.int64)
_NO_ROWS = np.zeros(0, np.int64)
_NO_BOXES.flags.writeable = _NO_LABELS.flags.writeable = _NO_ROWS.flags.writeable = False


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
    rows: np.ndarray = field(default_factory=lambda: _NO_ROWS)  # int64 [N]: each box's index in 'annotations'

    @property
    def path(self) -> Path:
        return Path(self.file)


def read_coco_json(ann_file: Path) -> dict:
    """Load and check the top-level structure of a COCO annotation file."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise UserError(f"annotation file '{ann_file}' does not exist.")
    data = _parse_json(ann_file)
    if not isinstance(data, dict):
        raise UserError(f"annotation file '{ann_file}' is not COCO format: the top level is a "
                        f"{type(data).__name__}, expected an object with images, annotations, categories.")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"annotation file '{ann_file}' is not COCO format: the key '{key}' "
                            f"is missing or not a list (found keys: {sorted(data)}).")
    if not data["categories"]:
        raise UserError(f"annotation file '{ann_file}': 'categories' is empty; a detector needs at least one class.")
    seen = set()
    for index, category in enumerate(data["categories"]):
        cat_id = category.get("id") if isinstance(category, dict) else None
        if type(cat_id) is not int or not -2**62 < cat_id < 2**62:
            raise UserError(f"annotation file '{ann_file}': categories[{index}] needs an integer 'id', got "
                            f"{brief(category)}.")
        if cat_id in seen:
            raise UserError(f"annotation file '{ann_file}': categories[{index}]: duplicate category id {cat_id}.")
        seen.add(cat_id)
    return data


@dataclass
class FileBoxes:
    """The file's non-crowd annotations with a finite box, as written (before any check or clip):
    what the preflight judges the file's box format and its per-class counts by."""

    xywh: np.ndarray  # float64 [N, 4]
    labels: np.ndarray  # int64 [N], 0 for a category not in 'categories'
    image_wh: np.ndarray  # float64 [N, 2], inf for an image id not in 'images'


class CocoDetection(torch.utils.data.Dataset):
    """A COCO split. Items are (image float tensor [3, H, W] in [0, 1], target dict).

    Indexing takes an int, or an (index, epoch[, copy]) tuple from the training sampler so that
    random augmentations are a function of (seed, epoch, index, copy): identical after a resume.
    """

    def __init__(self, ann_file: Path, img_dir: Path, *, missing_image: str = "error",
                 unknown_category: str = "error", degenerate_box: str = "drop",
                 box_outside_image: str = "clip", non_finite_box: str = "error", bad_mask: str = "drop",
                 unsafe_path: str = "error", check_images: int | str = "all", masks: bool = False,
                 load_masks: bool | None = None, transforms: Optional[Callable] = None, seed: int = 0):
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.transforms = transforms if transforms is not None else ToTensor()
        self.seed = seed
        self.report = DropReport()
        self._bad_mask_rows: set[int] = set()
        self._file_boxes: FileBoxes | None = None  # set by the vectorized index, else derived on demand
        self._policy = dict(missing_image=missing_image, unknown_category=unknown_category,
                            degenerate_box=degenerate_box, box_outside_image=box_outside_image,
                            non_finite_box=non_finite_box, bad_mask=bad_mask, unsafe_path=unsafe_path)
        # masks: every kept object's segmentation checked (bad_mask policy); load_masks (default: the
        # same): targets carry "masks" uint8 [N, H, W] (evaluation reads them from the file instead)
        self.masks = masks if load_masks is None else load_masks
        with _no_gc():  # millions of small containers: the cyclic GC's scans were half of the json time
            self.raw = read_coco_json(self.ann_file)
            self.records = self._index()
        if masks:
            had_objects = any(len(r.labels) for r in self.records)
            self.records = [self._with_valid_masks(r) for r in self.records]
            if had_objects and not any(len(r.labels) for r in self.records):
                dropped = self.report.counts["bad_mask"]
                raise UserError(
                    f"{self.ann_file}: model.mask.enabled is on but none of its {dropped} objects has a usable "
                    f"segmentation ({'; '.join(self.report.examples['bad_mask'][:2])}). Train boxes only with "
                    f"model.mask.enabled=false, or add polygons or RLE masks under 'segmentation'.")
        self.records = self._check_image_files(check_images)

    def _index(self) -> list[ImageRecord]:
        self.categories = sorted(self.raw["categories"], key=lambda c: c["id"])
        self.label_to_cat_id = {i + 1: int(c["id"]) for i, c in enumerate(self.categories)}
        self.cat_id_to_label = {cat: label for label, cat in self.label_to_cat_id.items()}
        self.class_names = [str(c.get("name", c["id"])) for c in self.categories]
        return self._build_records()

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @functools.cached_property
    def coco_image_ids(self) -> dict:
        """{the file's image id: the integer pycocotools knows the image by} (its position + 1). The
        file's ids may be strings, or ints and strings side by side, which pycocotools' sorting
        (np.unique) cannot order; ours are never compared with one another, only looked up."""
        return {image["id"]: position + 1 for position, image in enumerate(self.raw["images"])}

    def results_for_coco(self, results: list[dict]) -> list[dict]:
        """Copies of COCO results (written with the file's ids) with pycocotools' image ids."""
        ids = self.coco_image_ids
        return [dict(r, image_id=ids[r["image_id"]]) for r in results]

    def coco_api(self):
        """pycocotools COCO object of `evaluation_json` (for evaluation), its images known by
        `coco_image_ids`; hand it results through `results_for_coco`. Annotations of an image not in
        'images' are left out (the loader counted them; they could not be scored)."""
        from pycocotools.coco import COCO

        ids = self.coco_image_ids
        data = self.evaluation_json
        anns = [dict(a, image_id=ids[key]) for a in data["annotations"] if (key := _hashable(a.get("image_id"))) in ids]
        coco = COCO()
        coco.dataset = {**data, "images": [dict(image, id=ids[image["id"]]) for image in data["images"]],
                        "annotations": anns}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        return coco

    @functools.cached_property
    def evaluation_json(self) -> dict:
        """The annotation file as pycocotools' evaluation needs it (built once): every annotation with a
        unique id (duplicates would silently merge ground truth), an area and iscrowd; boxes
        derived from segmentations; records the loader rejected (bad boxes) left out."""
        anns, seen, fixed = [], set(), 0
        for row, ann in enumerate(self.raw["annotations"]):
            if row in self._bad_mask_rows:
                continue  # dropped for its mask (pycocotools could not score it)
            if not isinstance(ann, dict) or any(isinstance(ann.get(k), (bool, list, dict))
                                                for k in ("image_id", "category_id")):
                continue  # the loader reported these (unknown image or category)
            bbox = ann.get("bbox") or _bbox_from_segmentation(ann.get("segmentation"), None, None, None)
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(
                    isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
                continue
            ann = dict(ann, bbox=bbox, iscrowd=ann.get("iscrowd", 0) or 0)
            ann.setdefault("area", float(bbox[2]) * float(bbox[3]))
            if ann.get("id") is None or _hashable(ann["id"]) in seen or type(ann["id"]) is not int:
                fixed += 1  # pycocotools needs unique plain ids
            seen.add(_hashable(ann.get("id")))
            anns.append(ann)
        if fixed:  # counted in the load report (see _build_records)
            anns = [dict(a, id=i + 1) for i, a in enumerate(anns)]
        return {**self.raw, "annotations": anns}

    @property
    def file_boxes(self) -> FileBoxes:
        if self._file_boxes is None:  # the file was not plain enough for the vectorized index
            size_of = {_hashable(im["id"]): (im["width"], im["height"]) for im in self.raw["images"]}
            anns = [a for a in self.evaluation_json["annotations"] if not a.get("iscrowd", 0)]
            self._file_boxes = FileBoxes(
                np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
                np.array([self.cat_id_to_label.get(_hashable(a.get("category_id")), 0) for a in anns], np.int64),
                np.array([size_of.get(_hashable(a.get("image_id")), (np.inf, np.inf)) for a in anns],
                         dtype=np.float64).reshape(-1, 2))
        return self._file_boxes

    # ------------------------------------------------------------------ loading
    def _handle(self, kind: str, where: str, problem: str) -> None:
        """Apply the policy for a bad record: raise, or count the drop."""
        if self._policy[kind] == "error":
            raise UserError(f"{self.ann_file}: {where}: {problem}. To drop such records instead, set "
                            f"data.bad_records.{kind}: drop.")
        self.report.add(kind, where)

    def _build_records(self) -> list[ImageRecord]:
        """One record per image whose file exists, with its valid boxes.

        COCO-size files (860,000 boxes) index as fast as pycocotools: the clean annotations are
        checked with numpy all at once; only the ones a vectorized check flags go through the
        per-record path that applies the bad-record policies and names the record. Image files
        are not opened here (118,000 PIL opens took 44 s): existence comes from one directory
        listing per folder, readability and size are checked when an image is first loaded."""
        images = self._index_images()
        anns = self.raw["annotations"]
        columns = _annotation_columns(anns)
        ids = columns.ids if columns is not None else [a.get("id") for a in anns if isinstance(a, dict)]
        self._count_bad_ids(ids)
        kept_by_image: dict = defaultdict(list)
        clean_by_image: dict = {}
        if columns is None:  # some record is not plain: the per-record path finds and names it
            suspects, crowd_per_image = range(len(anns)), [0] * len(images)
        else:
            suspects, crowd_per_image = self._vector_checks(columns, images, clean_by_image)
        for index in suspects:
            self._check_one(index, anns[index], images, kept_by_image)
        img_dir = str(self.img_dir)
        paths = [os.path.join(img_dir, image["file_name"]) for image in images.values()]
        unsafe = _names_leaving(img_dir, [image["file_name"] for image in images.values()])
        existing = _existing_files([p for i, p in enumerate(paths) if i not in unsafe] if unsafe else paths)
        records = []
        for position, ((image_id, image), path, num_crowd) in enumerate(zip(images.items(), paths, crowd_per_image)):
            if position in unsafe:
                self._handle("unsafe_path", f"images[{position}] (id {image_id!r:.100})",
                             f"file_name {image['file_name']!r:.200} {unsafe[position]}")
                continue
            if path not in existing:
                self._handle("missing_image", f"image id {image_id} '{path}'", "the image file does not exist")
                continue
            records.append(self._record(image, path, kept_by_image.get(image_id), clean_by_image.get(image_id),
                                        num_crowd))
        return records

    def _count_bad_ids(self, ids: list) -> None:
        named = [i for i in ids if i is not None]
        try:
            distinct = len(set(named))
        except TypeError:  # a list or dict as an id
            distinct = len(set(_hashable(i) for i in named))
        if len(ids) - distinct:
            self.report.add("annotation ids renumbered for evaluation",
                            f"{len(ids) - distinct} missing or duplicate ids")

    def _index_images(self) -> dict:
        images = _plain_images(self.raw["images"])
        if images is not None:
            return images
        images = {}  # some image is not plain: find and name it
        for index, image in enumerate(self.raw["images"]):
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
            if key in images:
                raise UserError(f"{self.ann_file}: {where}: duplicate image id {brief(image['id'])}.")
            images[key] = image
        return images

    def _vector_checks(self, columns: "AnnotationColumns", images: dict, clean_by_image: dict):
        """Keep every annotation that passes all checks at once (clipped to its image within the
        border tolerance, as the per-record path does) in `clean_by_image` as (rows, boxes,
        labels); return the indices of the rest and the number of clean crowd boxes per image."""
        n = len(columns.image_ids)
        position = {key: i for i, key in enumerate(images)}
        image_pos = np.fromiter(map(position.get, columns.image_ids, repeat(-1)), np.int64, n)
        label = np.fromiter(map(self.cat_id_to_label.get, columns.category_ids, repeat(0)), np.int64, n)
        is_crowd = np.fromiter(map(bool, columns.crowd), bool, n)
        known_image = image_pos >= 0
        sizes = np.array([(im["width"], im["height"]) for im in images.values()], dtype=np.float64).reshape(-1, 2)
        size = sizes[np.where(known_image, image_pos, 0)] if len(sizes) else np.zeros((n, 2))
        bbox = columns.bbox
        x0, y0, w, h = bbox.T
        with np.errstate(invalid="ignore", over="ignore"):
            xyxy = np.stack([x0, y0, x0 + w, y0 + h], axis=1)
            clipped = np.clip(xyxy, 0.0, np.concatenate([size, size], axis=1))
            inside = ((np.abs(xyxy - clipped).max(axis=1) <= BORDER_TOLERANCE_PX)
                      & (clipped[:, 2] - clipped[:, 0] >= 1e-3) & (clipped[:, 3] - clipped[:, 1] >= 1e-3))
            clean = (np.isfinite(bbox).all(axis=1) & known_image & (label > 0)
                     & (is_crowd | ((w > 0) & (h > 0) & inside)))
        as_written = ~is_crowd & np.isfinite(bbox).all(axis=1)
        self._file_boxes = FileBoxes(bbox[as_written], label[as_written],
                                     np.where(known_image[:, None], size, np.inf)[as_written])
        crowd_per_image = np.bincount(image_pos[clean & is_crowd], minlength=len(images)).tolist()
        keep = np.flatnonzero(clean & ~is_crowd)
        keep = keep[np.argsort(image_pos[keep], kind="stable")]  # grouped by image, file order within
        if len(keep):
            bounds = np.flatnonzero(np.diff(image_pos[keep])) + 1
            keys = list(images)
            firsts = image_pos[keep[np.r_[0, bounds]]].tolist()
            boxes, labels = clipped[keep].astype(np.float32), label[keep]
            # slices, not np.split: its per-piece overhead was 0.7 s for 118,000 images
            per_image = ((keep[a:b], boxes[a:b], labels[a:b])
                         for a, b in zip([0, *bounds.tolist()], [*bounds.tolist(), len(keep)]))
            clean_by_image.update(zip(map(keys.__getitem__, firsts), per_image))
        return np.flatnonzero(~clean), crowd_per_image

    def _check_one(self, index: int, ann, images: dict, kept_by_image: dict) -> None:
        """The per-record checks of one annotation: policies applied, the record named."""
        where = f"annotations[{index}] (id {ann.get('id') if isinstance(ann, dict) else '?'})"
        if isinstance(ann, dict) and "bbox" not in ann and ann.get("segmentation") \
                and _hashable(ann.get("image_id")) in images:
            ann = dict(ann, bbox=_bbox_from_segmentation(ann["segmentation"], images[_hashable(ann["image_id"])],
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
            self._handle("non_finite_box", where, f"bbox {bbox!r} has non-finite (NaN or infinite) coordinates")
            return
        image_id = _hashable(ann["image_id"])
        if image_id not in images:
            self.report.add("unknown_image_id", where)
            return
        if _hashable(ann["category_id"]) not in self.cat_id_to_label:
            self._handle("unknown_category", where,
                         f"category_id {brief(ann['category_id'])} is not in 'categories' "
                         f"(known ids: {sorted(self.cat_id_to_label)[:20]})")
            return
        kept_by_image[image_id].append((index, ann))

    def _record(self, image: dict, path: str, anns: list | None, clean: tuple | None, num_crowd: int) -> ImageRecord:
        """The image's boxes: the vector-checked ones (`clean`: rows, boxes, labels) merged in
        file order with the flagged ones (`anns`), checked here one by one."""
        width, height = int(image["width"]), int(image["height"])
        if not anns:  # the common case: nothing flagged
            rows, boxes, labels = clean if clean is not None else (_NO_ROWS, _NO_BOXES, _NO_LABELS)
            return ImageRecord(image_id=image["id"], file=path, width=width, height=height,
                               boxes=boxes, labels=labels, num_crowd=num_crowd, rows=rows)
        rows, boxes, labels, flagged_crowd = self._checked_boxes(image, anns)
        if clean is not None:
            clean_rows, clean_boxes, clean_labels = clean
            order = np.argsort(np.concatenate([rows, clean_rows]), kind="stable")
            boxes = np.concatenate([boxes, clean_boxes])[order]
            labels = np.concatenate([labels, clean_labels])[order]
            rows = np.concatenate([rows, clean_rows])[order]
        return ImageRecord(image_id=image["id"], file=path, width=width, height=height,
                           boxes=boxes, labels=labels, num_crowd=num_crowd + flagged_crowd, rows=rows)

    def _with_valid_masks(self, record: ImageRecord) -> ImageRecord:
        """The record without the objects whose segmentation gives no mask (bad_mask policy)."""
        from rcnn_trainer.data.masks import segmentation_problem

        anns = self.raw["annotations"]
        bad = []
        for k, row in enumerate(record.rows.tolist()):
            segmentation = anns[row].get("segmentation")
            problem = ("it has no segmentation (model.mask.enabled needs one per object)" if not segmentation
                       else segmentation_problem(segmentation, record.height, record.width))
            if problem:
                where = f"annotations[{row}] (id {anns[row].get('id')}, image '{os.path.basename(record.file)}')"
                self._handle("bad_mask", where, problem)
                bad.append(k)
                self._bad_mask_rows.add(row)
        if not bad:
            return record
        keep = np.setdiff1d(np.arange(len(record.rows)), bad)
        return dataclasses.replace(record, boxes=record.boxes[keep], labels=record.labels[keep],
                                   rows=record.rows[keep])

    def _checked_boxes(self, image: dict, anns: list):
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
                self._handle("degenerate_box", where, f"box [x, y, w, h] = {ann['bbox']} has zero or negative size")
                continue
            box = [x, y, x + w, y + h]
            clipped = [min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
                       min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)]
            overshoot = max(abs(a - b) for a, b in zip(box, clipped))
            if overshoot > BORDER_TOLERANCE_PX:
                policy = self._policy["box_outside_image"]
                outside = (f"box [x, y, w, h] = {ann['bbox']} extends {overshoot:.1f} px outside the "
                           f"{int(width)}x{int(height)} image")
                if policy == "clip":
                    self.report.add("box_outside_image (clipped)", where)
                else:
                    self._handle("box_outside_image", where, outside)
                    continue
            if clipped[2] - clipped[0] < 1e-3 or clipped[3] - clipped[1] < 1e-3:
                self.report.add("box_outside_image (nothing left after clipping)", where)
                continue
            boxes.append(clipped)
            labels.append(self.cat_id_to_label[_hashable(ann["category_id"])])
            rows.append(index)
        return (np.asarray(rows, np.int64), np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64), num_crowd)

    def _check_image_files(self, check: int | str) -> list[ImageRecord]:
        """Read the header of `all` images or a seeded sample; the bad ones get the missing_image policy."""
        records = self.records
        chosen = range(len(records))
        if check != "all" and check < len(records):
            chosen = sorted(np.random.default_rng(self.seed).choice(len(records), size=check, replace=False))
        bad = set()
        for i in chosen:
            problem = check_image_file(records[i].path, (records[i].width, records[i].height))
            if problem:
                self._handle("missing_image", f"image id {records[i].image_id} '{records[i].path}'", problem)
                bad.add(i)
        return [r for i, r in enumerate(records) if i not in bad]

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.records)

    # An image found unreadable only when it is loaded (indexing reads a sample of the files)
    # under data.bad_records.missing_image: drop. Training reads the next readable image in its
    # place (the batch keeps its size); evaluation (build_dataset sets this) skips it: the item is
    # None, which the loader's collate leaves out, so exactly the images read are scored.
    skip_unreadable: bool = False

    def __getitem__(self, key):
        """(image, target), or None for an unreadable image dropped under `skip_unreadable`."""
        index, epoch, copy, min_size = parse_key(key)
        loaded = self._read_from(index)
        if loaded is None:
            return None
        index, image = loaded
        record = self.records[index]
        if image.size != (record.width, record.height):
            raise UserError(f"{self.ann_file}: image id {record.image_id} '{record.path}' is "
                            f"{image.size[0]}x{image.size[1]} but the annotation says "
                            f"{record.width}x{record.height}; fix width/height in the file.")
        target = {
            "boxes": torch.from_numpy(record.boxes.copy()),
            "labels": torch.from_numpy(record.labels.copy()),
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
        }
        if self.masks:
            from rcnn_trainer.data.masks import rasterize

            segmentations = [self.raw["annotations"][row]["segmentation"] for row in record.rows.tolist()]
            # at the size the transforms give the image, never at full size: 100 objects of a
            # 4000 x 4000 image are 1.6 GB there, 64 MB at 800 x 800 (tools/mask_memory.py --large)
            size = output_size(self.transforms, record.height, record.width, min_size)
            target["masks"] = torch.from_numpy(rasterize(segmentations, record.height, record.width, size))
        # an image's repeats within an epoch (repeat-factor sampling) each draw their own
        rng = np.random.default_rng((self.seed, epoch, index) if copy == 0 else (self.seed, epoch, index, copy))
        image, target = (self.transforms(image, target, rng) if min_size is None
                         else self.transforms(image, target, rng, min_size))
        return image, target

    def _read_from(self, index: int) -> tuple[int, Image.Image] | None:
        """(index, RGB image) of record `index`, or, when its file turns out unreadable, what the
        missing_image policy says: error raises; drop counts it and gives None (skip_unreadable)
        or the next readable record, searched in a loop (a long run of missing files once
        overflowed the recursion), at most once round the dataset."""
        for step in range(len(self.records)):
            position = (index + step) % len(self.records)
            record = self.records[position]
            # the header first (a bomb or a lying size is refused before it is decoded), then the pixels
            found = check_image_file(record.path, (record.width, record.height)) or read_rgb(record.path)
            if not isinstance(found, str):
                return position, found
            self._handle("missing_image", f"image id {record.image_id} '{record.path}'", found)
            if self.skip_unreadable:
                return None
        raise UserError(f"{self.ann_file}: none of its {len(self.records)} images can be read (each was dropped "
                        f"under data.bad_records.missing_image: drop; the last: image id {record.image_id} "
                        f"'{record.path}': {found}). Check the image files and the img_dir setting.")


def parse_key(key) -> tuple[int, int, int, int | None]:
    """(index, epoch, copy, min_size) from the train sampler's (index, epoch[, copy[, min_size]])
    (min_size: the batch's short side under multi-scale training), or from a plain index."""
    if not isinstance(key, tuple):
        return key, 0, 0, None
    return key[0], key[1] if len(key) > 1 else 0, key[2] if len(key) > 2 else 0, key[3] if len(key) > 3 else None


def _parse_json(path: Path):
    """The standard library's parser. orjson parsed a COCO train2017-size file in 1.2 s instead of
    2.8 s but its peak memory was 0.26 GiB higher (it builds its own document first): 1.55x
    pycocotools' indexing memory, past the 1.5x we allow (docs/benchmarks.md)."""
    try:
        data = json.loads(path.read_bytes())
    except RecursionError:
        raise UserError(f"annotation file '{path}' nests lists or objects too deeply to read (hundreds of levels); "
                        f"no COCO file does.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"annotation file '{path}' is not valid JSON: {err}.") from None
    if isinstance(data, dict):  # the small parts whole; images and annotations are checked field by field
        for key, value in data.items():
            if key not in ("images", "annotations"):
                check_nesting(value, f"annotation file '{path}', key {brief(key)}", MAX_JSON_DEPTH, 10_000_000)
    return data


def _bbox_from_segmentation(segmentation, image: dict | None, ann_file, where) -> list | None:
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


@contextlib.contextmanager
def _no_gc():
    """The cyclic GC paused while millions of json containers are made (its scans were half of
    the parse time); then they are frozen, so that no later full collection walks them again (it
    cost 0.4-0.6 s per collection on a COCO-size file). Plain json holds no cycles: reference
    counting still frees it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _hashable(value):
    """A json id as a dict key: lists and dicts (bad but possible) become their repr."""
    return value if isinstance(value, (int, str, float, type(None))) and not isinstance(value, bool) else repr(value)


def _plain_images(images: list) -> dict | None:
    """{id: image} when every image is a dict with an int or str id (all distinct), a non-empty
    file_name and a positive size under 1e6 px; else None. Checked per field in C-level passes:
    the per-image loop took 0.5 s at 118,000 images."""
    try:
        ids, names, widths, heights = (list(map(itemgetter(key), images))
                                       for key in ("id", "file_name", "width", "height"))
    except (KeyError, TypeError):
        return None
    if set(map(type, ids)) - {int, str} or set(map(type, names)) - {str} or (names and min(map(len, names)) == 0):
        return None
    sizes = widths + heights
    if set(map(type, sizes)) - {int, float}:
        return None
    sizes = np.array(sizes, dtype=np.float64)
    if not ((sizes > 0) & (sizes < 1e6)).all():
        return None
    by_id = dict(zip(ids, images))
    return by_id if len(by_id) == len(images) else None


@dataclass
class AnnotationColumns:
    bbox: np.ndarray  # float64 [N, 4] xywh as in the file
    image_ids: list
    category_ids: list
    crowd: list
    ids: list


def _annotation_columns(anns: list) -> AnnotationColumns | None:
    """The annotations as columns, or None when any record is not a dict with plain int / float
    fields (the per-record path then names it). One C-level pass per field (map, set, fromiter):
    Python loops over 860,000 records were most of the indexing time."""
    try:
        bbox = list(map(itemgetter("bbox"), anns))
        image_ids = list(map(itemgetter("image_id"), anns))
        category_ids = list(map(itemgetter("category_id"), anns))
        crowd = list(map(dict.get, anns, repeat("iscrowd"), repeat(0)))
        ids = list(map(dict.get, anns, repeat("id")))
    except (KeyError, TypeError):
        return None
    if set(map(type, image_ids)) - {int} or set(map(type, category_ids)) - {int}:
        return None
    if set(map(type, bbox)) - {list} or set(map(len, bbox)) - {4}:
        return None
    if set(map(type, chain.from_iterable(bbox))) - {int, float}:
        return None  # bools and strings are not numbers here, as in the per-record path
    flat = np.fromiter(chain.from_iterable(bbox), np.float64, 4 * len(bbox))
    return AnnotationColumns(flat.reshape(-1, 4), image_ids, category_ids, crowd, ids)


def _names_leaving(img_dir: str, names: list[str]) -> dict[int, str]:
    """{position: why} of the file names that lead outside img_dir (absolute, or through '..') or
    hold a NUL. A clean file is cleared by substring searches over all names joined (~5 ms for
    118,000; a test per name took 40 ms); else the names are tested one by one and only the few
    suspicious ones resolved. realpath follows links, so a '..' after a link is judged where it really
    leads; a link inside img_dir reached without '..' is the user's own setup and is not questioned."""
    joined = "\n" + "\n".join(names)
    if os.name == "posix" and not any(mark in joined for mark in ("..", "\\", "\0", "\n/")):
        return {}
    suspects = [i for i, name in enumerate(names)
                if ".." in name or "\\" in name or "\0" in name or os.path.isabs(name)]
    if not suspects:
        return {}
    root = os.path.realpath(img_dir)
    leaving = {}
    for i in suspects:
        if "\0" in names[i]:
            leaving[i] = "holds a NUL character, which no file name can"
            continue
        target = os.path.realpath(os.path.join(img_dir, names[i]))
        try:
            inside = os.path.commonpath([root, target]) == root
        except ValueError:  # another drive (Windows)
            inside = False
        if not inside:
            leaving[i] = (f"leads outside img_dir '{img_dir}' (to '{target}'); file names are read under "
                          f"img_dir, an absolute path or '..' may not leave it")
    return leaving


def _existing_files(paths: list[str]) -> set[str]:
    """The paths that exist: one listing per folder instead of a stat (or an open) per image."""
    listings: dict[str, set[str]] = {}
    found = set()
    for path in paths:
        folder, _, name = path.rpartition(os.sep)
        if folder not in listings:
            try:
                listings[folder] = {e.name for e in os.scandir(folder or ".") if not e.is_dir()}
            except OSError:
                listings[folder] = set()
        if name in listings[folder]:
            found.add(path)
    return found


def check_image_file(path: Path | str, declared: tuple[int, int] | None = None) -> str | None:
    """Why the image file cannot be used, or None. Reads the header only (cheap): a missing or
    unreadable file, a decompression bomb (PIL's limit, ~179 M pixels), or a header whose size is
    not the one the annotation file declares (a lying header would be decoded to a huge array)."""
    if not os.path.isfile(path):
        return "the image file does not exist"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                size = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"the image is too large to decode safely ({err})"
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        return f"the image file is not a readable image ({err})"
    if declared is not None and tuple(size) != tuple(declared):
        return (f"the file is {size[0]}x{size[1]} but the annotation says {declared[0]}x{declared[1]}; "
                f"fix width/height in the file")
    return None
