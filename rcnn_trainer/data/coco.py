"""COCO-format detection dataset: the split's records and its items, plus what pycocotools'
evaluation needs from the file.

Targets follow torchvision: {"boxes": float32 xyxy [N, 4], "labels": int64 [N]} with labels
in 1..C (0 is background), plus "image_id" (the file's id: an int or a str, 1 and "1" being two
images) and "orig_size" (h, w). pycocotools is handed an integer per image instead
(`coco_image_ids`, `coco_api`, `results_for_coco`); what we write for people keeps the file's ids.
Category ids are mapped to contiguous labels; `label_to_cat_id` maps predictions back.
Crowd annotations are left out of training targets (COCO evaluation ignores detections that
fall on them, using the original annotation file). Images without objects stay as negatives.

Where the rest lives: reading the file's top level in coco_file.py, the vectorized index in
coco_index.py, records, bad-record policies and the per-record checks in records.py, image
files (header checks, reading under the missing_image policy) in images.py.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rcnn_trainer.data.coco_file import hashable, no_gc, read_coco_json
from rcnn_trainer.data.coco_index import build_records
from rcnn_trainer.data.images import check_image_file, check_image_files, check_loaded_size, read_first_readable
from rcnn_trainer.data.records import (BORDER_TOLERANCE_PX, DropReport, FileBoxes, ImageRecord, RecordChecks,
                                       RecordPolicy, bbox_from_segmentation)
from rcnn_trainer.data.transforms import ToTensor, output_size

# the names callers import from here (the dataset's own types and checks)
__all__ = ["BORDER_TOLERANCE_PX", "CocoDetection", "DropReport", "FileBoxes", "ImageRecord", "RecordPolicy",
           "check_image_file", "parse_key", "read_coco_json"]


class CocoDetection(torch.utils.data.Dataset):
    """A COCO split. Items are (image float tensor [3, H, W] in [0, 1], target dict).

    Indexing takes an int, or an (index, epoch[, copy]) tuple from the training sampler so that
    random augmentations are a function of (seed, epoch, index, copy): identical after a resume.

    `policy`: what each kind of bad record does (stop or drop; drops are counted in `report`).
    `check_images`: headers read at indexing, `all` or a seeded sample of this many. `masks`: every
    kept object's segmentation checked (bad_mask policy); `load_masks` (default: the same): targets
    carry "masks" uint8 [N, H, W] (evaluation reads them from the file instead). `raw`: the COCO dict
    already built from other labels (data/labels/: VOC, YOLO, LabelMe), read instead of `ann_file`,
    which then only names the source; `report`: the reader's drop counts, continued here.
    """

    def __init__(self, ann_file: Path, img_dir: Path, *, policy: RecordPolicy | None = None,
                 check_images: int | str = "all", masks: bool = False, load_masks: bool | None = None,
                 transforms: Callable | None = None, seed: int = 0, raw: dict | None = None,
                 report: DropReport | None = None):
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.transforms = transforms if transforms is not None else ToTensor()
        self.seed = seed
        self.policy = policy if policy is not None else RecordPolicy()  # the config's defaults
        self.report = report if report is not None else DropReport()  # a label reader's counts continue here
        self._bad_mask_rows: set[int] = set()  # annotations dropped for their mask: left out of evaluation
        self.masks = masks if load_masks is None else load_masks
        with no_gc():  # millions of small containers: the cyclic GC's scans were half of the json time
            # `raw`: a COCO dict already built (data/labels/ from VOC, YOLO, LabelMe); ann_file then names its source
            self.raw = read_coco_json(self.ann_file) if raw is None else raw
            self._index_categories()
            self._checks = RecordChecks(self.ann_file, self.policy, self.report, self.cat_id_to_label)
            # file_boxes: set by the vectorized index, else (None) derived on demand
            self.records, self._file_boxes = build_records(self.raw, self.img_dir, self._checks)
        if masks:
            self.records = self._checks.usable_masks(self.records, self.raw["annotations"], self._bad_mask_rows)
        self.records = check_image_files(self.records, check_images, self.seed, self._checks)

    def _index_categories(self) -> None:
        self.categories = sorted(self.raw["categories"], key=lambda c: c["id"])
        self.label_to_cat_id = {i + 1: int(c["id"]) for i, c in enumerate(self.categories)}
        self.cat_id_to_label = {cat: label for label, cat in self.label_to_cat_id.items()}
        self.class_names = [str(c.get("name", c["id"])) for c in self.categories]

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    # ------------------------------------------------------------------ evaluation
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
        anns = [dict(a, image_id=ids[key]) for a in data["annotations"] if (key := hashable(a.get("image_id"))) in ids]
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
            bbox = ann.get("bbox") or bbox_from_segmentation(ann.get("segmentation"))
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(
                    isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
                continue
            # a VOC `difficult` object: trained on, ignored by evaluation as VOC's own does (docs/formats.md)
            ann = dict(ann, bbox=bbox, iscrowd=ann.get("iscrowd", 0) or ann.get("difficult", 0) or 0)
            ann.setdefault("area", float(bbox[2]) * float(bbox[3]))
            if ann.get("id") is None or hashable(ann["id"]) in seen or type(ann["id"]) is not int:
                fixed += 1  # pycocotools needs unique plain ids
            seen.add(hashable(ann.get("id")))
            anns.append(ann)
        if fixed:  # counted in the load report (RecordChecks.count_bad_ids)
            anns = [dict(a, id=i + 1) for i, a in enumerate(anns)]
        return {**self.raw, "annotations": anns}

    @property
    def file_boxes(self) -> FileBoxes:
        if self._file_boxes is None:  # the file was not plain enough for the vectorized index
            size_of = {hashable(im["id"]): (im["width"], im["height"]) for im in self.raw["images"]}
            anns = [a for a in self.evaluation_json["annotations"] if not a.get("iscrowd", 0)]
            self._file_boxes = FileBoxes(
                np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
                np.array([self.cat_id_to_label.get(hashable(a.get("category_id")), 0) for a in anns], np.int64),
                np.array([size_of.get(hashable(a.get("image_id")), (np.inf, np.inf)) for a in anns],
                         dtype=np.float64).reshape(-1, 2))
        return self._file_boxes

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
        loaded = read_first_readable(self.records, index, self._checks, self.skip_unreadable)
        if loaded is None:
            return None
        index, image = loaded
        record = self.records[index]
        check_loaded_size(image, record, self.ann_file)
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


def parse_key(key) -> tuple[int, int, int, int | None]:
    """(index, epoch, copy, min_size) from the train sampler's (index, epoch[, copy[, min_size]])
    (min_size: the batch's short side under multi-scale training), or from a plain index."""
    if not isinstance(key, tuple):
        return key, 0, 0, None
    return key[0], key[1] if len(key) > 1 else 0, key[2] if len(key) > 2 else 0, key[3] if len(key) > 3 else None
