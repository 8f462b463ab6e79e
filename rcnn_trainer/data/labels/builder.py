"""The COCO dict every label reader builds, and the record checks that need the label file's context.

A reader adds images and objects here; each object is checked (non-finite numbers, zero size, a
box past the border, an unknown class) under the same `data.bad_records` policies as a COCO file,
with a message that names the label file and the line or object. What comes out is the plain
COCO dict (images / annotations / categories) that CocoDetection indexes as it indexes a json file.

Image ids are the label file's path under the labels root without its extension ("sub/000005"):
results and label issues then name the original file. Category ids: the YOLO class index, or 1..K
in the sorted order of the class names (VOC, LabelMe).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from rcnn_trainer.data.records import BORDER_TOLERANCE_PX, DropReport, RecordChecks, RecordPolicy
from rcnn_trainer.input_limits import brief

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
MAX_LISTED_FILES = 5_000_000  # files walked in one labels or images folder


class LabelSet:
    """Accumulates one split's COCO dict from label files. `policy`/`report`: the dataset's."""

    def __init__(self, policy: RecordPolicy, report: DropReport, names: list[str], first_id: int = 1):
        """`names`: the classes in category id order, ids from `first_id` (YOLO's class index: 0)."""
        self.policy, self.report = policy, report
        self.categories = [{"id": first_id + i, "name": name} for i, name in enumerate(names)]
        self.category_of = {c["name"]: c["id"] for c in reversed(self.categories)}  # a repeated name: its first id
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def handle(self, kind: str, label_file, where: str, problem: str) -> None:
        """Apply the policy of a bad record named by its label file and line/object: raise or count."""
        RecordChecks(Path(label_file), self.policy, self.report, {}).handle(kind, where, problem)

    def coco(self) -> dict:
        return {"images": self.images, "annotations": self.annotations, "categories": self.categories}

    def add_image(self, image_id: str, image_path: str, img_dir: str, width: int, height: int, label_file) -> dict:
        image = {"id": image_id, "file_name": os.path.relpath(image_path, img_dir).replace(os.sep, "/"),
                 "width": int(width), "height": int(height)}
        if label_file is not None:
            image["label_file"] = str(label_file)  # results name the original file by image id; this says where
        self.images.append(image)
        return image

    def category(self, name: str, label_file, where: str) -> int | None:
        """The category id of a class name, or None (unknown_category policy applied)."""
        cat = self.category_of.get(name)
        if cat is None:
            known = ", ".join(sorted(map(str, self.category_of))[:20])
            self.handle("unknown_category", label_file, where, f"class {brief(name)} is not one of the dataset's "
                        f"classes ({known})")
        return cat

    def add_object(self, image: dict, cat: int, xyxy: list[float], label_file, where: str,
                   polygons: list[list[float]] | None = None, difficult: bool = False) -> None:
        """Check a box (pixels, 0-based corners) under the policies and add it, clipped when the
        policy says so. `polygons`: COCO flat [x0, y0, x1, y1, ...] lists (masks for model.mask)."""
        if not all(math.isfinite(v) for v in xyxy):
            self.handle("non_finite_box", label_file, where, f"box {brief(xyxy)} has non-finite coordinates")
            return
        x0, y0, x1, y1 = xyxy
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            self.handle("degenerate_box", label_file, where,
                        f"box [x0, y0, x1, y1] = {[round(v, 3) for v in xyxy]} has zero or negative size")
            return
        w, h = image["width"], image["height"]
        clipped = [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w), min(max(y1, 0.0), h)]
        overshoot = max(abs(a - b) for a, b in zip(xyxy, clipped))
        if overshoot > BORDER_TOLERANCE_PX:
            if self.policy.box_outside_image != "clip":
                self.handle("box_outside_image", label_file, where,
                            f"box [x0, y0, x1, y1] = {[round(v, 3) for v in xyxy]} extends {overshoot:.1f} px "
                            f"outside the {w}x{h} image")
                return
            self.report.add("box_outside_image (clipped)", f"{label_file}: {where}")
        if clipped[2] - clipped[0] < 1e-3 or clipped[3] - clipped[1] < 1e-3:
            self.report.add("box_outside_image (nothing left after clipping)", f"{label_file}: {where}")
            return
        # the box is stored clipped only when it was out by more than the tolerance: the COCO index
        # clips the rest as it does for a json file
        x0, y0, x1, y1 = clipped if overshoot > BORDER_TOLERANCE_PX else xyxy
        ann = {"id": len(self.annotations) + 1, "image_id": image["id"], "category_id": cat,
               "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0,
               "area": polygon_area(polygons) if polygons else (x1 - x0) * (y1 - y0)}
        if polygons:
            ann["segmentation"] = polygons
        if difficult:
            ann["difficult"] = 1  # trained on; evaluation ignores it (CocoDetection.evaluation_json)
        self.annotations.append(ann)


def polygon_area(polygons: list[list[float]]) -> float:
    """Shoelace area summed over the polygons (COCO's `area` of a polygon object)."""
    total = 0.0
    for flat in polygons:
        xs, ys = flat[0::2], flat[1::2]
        total += abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2
    return total


def image_sizes(paths: list[str]) -> list[tuple[int, int] | str]:
    """(width, height) from each image's header, or why it cannot be read. Headers only (PIL opens
    lazily); threads because on network storage each open is a round trip."""
    if len(paths) < 16:
        return [_header_size(p) for p in paths]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(_header_size, paths))


def _header_size(path: str) -> tuple[int, int] | str:
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"the image file is not a readable image ({err})"


def leaves_folder(root: str, path: str) -> bool:
    """True when `path` (a name read from a label file, joined to a folder) leads outside root. As
    for a COCO file_name: a path inside root without '..' is not questioned (a link there is the
    user's own setup); one with '..' is judged where it really leads."""
    if "\0" in path:
        return True
    lexical = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if lexical == ".." or lexical.startswith(".." + os.sep) or os.path.isabs(lexical):
        return True
    if ".." not in Path(path).parts:
        return False
    real_root = os.path.realpath(root)
    try:
        return os.path.commonpath([real_root, os.path.realpath(path)]) != real_root
    except ValueError:  # another drive
        return True


def list_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files under `folder` (recursive, links to folders not followed) whose suffix is one of
    `suffixes` (case-insensitive), sorted."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        found += [Path(parent, f) for f in files if os.path.splitext(f)[1].lower() in suffixes]
        if len(found) > MAX_LISTED_FILES:
            break
    return sorted(found)


def images_by_stem(img_dir: Path) -> dict[str, str]:
    """{path under img_dir without extension (posix): the image file}: how a label file finds its
    image when the label does not name it (YOLO) or names it wrongly (VOC <filename>)."""
    by_stem: dict[str, str] = {}
    for path in list_files(img_dir, IMAGE_SUFFIXES):
        stem = path.relative_to(img_dir).with_suffix("").as_posix()
        by_stem.setdefault(stem, str(path))
    return by_stem
