"""LabelMe JSON: one file per image with `imagePath`, `imageWidth`, `imageHeight` and `shapes`
(each a `label`, a `shape_type` and `points` in pixels).

`ann_file` is a folder (every .json under it). The image is `imagePath` taken relative to the
json's folder (LabelMe's rule), else `img_dir/<the name of imagePath>`; either must lie under
img_dir. `rectangle` shapes (two opposite corners) are boxes; `polygon` shapes (3 or more points;
LabelMe's default when shape_type is missing) are objects with a mask, their box the polygon's
bounds. Shapes that share a label and a `group_id` are one object (LabelMe's way of drawing an
object in parts), as labelme2coco joins them. Lines, points, circles and masks are not objects a
box detector learns: they are counted in the load report and left out. The embedded `imageData`
is never decoded.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from rcnn_trainer.data.labels.builder import LabelSet, leaves_folder, list_files
from rcnn_trainer.data.records import DropReport, RecordPolicy
from rcnn_trainer.errors import UserError
from rcnn_trainer.input_limits import MAX_JSON_DEPTH, MAX_LABEL_FILE_BYTES, brief, check_file_size, check_nesting

OBJECT_SHAPES = ("rectangle", "polygon")


@dataclass
class Shape:
    label: str
    where: str  # "shapes[3] ('dog')"
    kind: str
    points: list  # [[x, y], ...] floats
    group: object = None


def parse_labelme(path: Path) -> tuple[dict, list[Shape]]:
    """(the file's top level, its shapes); a UserError naming the file and shape when malformed."""
    check_file_size(path, MAX_LABEL_FILE_BYTES, "LabelMe file")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise UserError(f"{path}: not valid JSON ({str(err)[:200]}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list) or not isinstance(
            data.get("imagePath"), str):
        raise UserError(f"{path}: not a LabelMe file: it needs 'shapes' (a list) and 'imagePath' (found "
                        f"{brief(sorted(data) if isinstance(data, dict) else type(data).__name__)}).")
    check_nesting(data["shapes"], str(path), MAX_JSON_DEPTH, what="LabelMe shapes")
    shapes = []
    for index, shape in enumerate(data["shapes"]):
        label = shape.get("label") if isinstance(shape, dict) else None
        where = f"shapes[{index}] ({brief(label)})"
        points = shape.get("points") if isinstance(shape, dict) else None
        if not isinstance(label, str) or not label or not isinstance(points, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            for v in p) for p in points):
            raise UserError(f"{path}: {where}: a shape needs a 'label' (text) and 'points' ([[x, y], ...] numbers); "
                            f"got {brief(shape)}.")
        kind = shape.get("shape_type") or "polygon"
        shapes.append(Shape(label, where, kind if isinstance(kind, str) else brief(kind),
                            [[float(x), float(y)] for x, y in points], shape.get("group_id")))
    return data, shapes


def labelme_names(ann_file: Path) -> set[str]:
    """The object class names of a split (for the category list two splits share)."""
    names = set()
    for path in list_files(ann_file, (".json",)) if ann_file.is_dir() else []:
        try:
            names |= {s.label for s in parse_labelme(path)[1] if s.kind in OBJECT_SHAPES}
        except (UserError, OSError):
            continue
    return names


def read_labelme(ann_file: Path, img_dir: Path, policy: RecordPolicy, report: DropReport,
                 other_names: set[str] = frozenset()) -> dict:
    """The split as a COCO dict; categories: this split's and `other_names`, sorted, ids 1..K."""
    files = list_files(ann_file, (".json",))
    if not files:
        raise UserError(f"'{ann_file}' holds no LabelMe .json file.")
    parsed = [(path, *parse_labelme(path)) for path in files]
    names = {s.label for _, _, shapes in parsed for s in shapes if s.kind in OBJECT_SHAPES} | set(other_names)
    labels = LabelSet(policy, report, sorted(names))
    for path, data, shapes in parsed:
        image_path = _image_path(path, data["imagePath"], img_dir, labels)
        if image_path is None:
            continue
        size = _size(path, data)
        image = labels.add_image(path.relative_to(ann_file).with_suffix("").as_posix(), image_path, str(img_dir),
                                 *size, path)
        for obj in _objects(shapes, labels.report, path):
            cat = labels.category(obj.label, path, obj.where)
            if cat is None:
                continue
            xs = [x for x, _ in obj.points]
            ys = [y for _, y in obj.points]
            box = [min(xs), min(ys), max(xs), max(ys)]
            polygons = None if obj.kind == "rectangle" else obj.group
            labels.add_object(image, cat, box, path, obj.where, polygons=polygons)
    return labels.coco()


def _objects(shapes: list[Shape], report: DropReport, path: Path) -> list[Shape]:
    """The objects of a file: rectangles, and polygons joined by (label, group_id); `group` then
    holds the object's flat polygons."""
    objects, groups = [], {}
    for shape in shapes:
        if shape.kind not in OBJECT_SHAPES:
            report.add(f"LabelMe {shape.kind[:40]} shapes (not objects; left out)", f"{path}: {shape.where}")
            continue
        if shape.kind == "rectangle" and len(shape.points) != 2 or shape.kind == "polygon" and len(shape.points) < 3:
            raise UserError(f"{path}: {shape.where}: a {shape.kind} needs {'2' if shape.kind == 'rectangle' else '3 or more'} "
                            f"points, got {len(shape.points)}.")
        if shape.kind == "rectangle":
            objects.append(shape)
            continue
        flat = [v for point in shape.points for v in point]
        key = (shape.label, shape.group) if shape.group is not None and not isinstance(shape.group, (list, dict)) \
            else id(shape)
        if key in groups:
            joined = groups[key]
            joined.points = joined.points + shape.points
            joined.group.append(flat)
        else:
            groups[key] = Shape(shape.label, shape.where, "polygon", shape.points, [flat])
            objects.append(groups[key])
    return objects


def _image_path(path: Path, image_path: str, img_dir: Path, labels: LabelSet) -> str | None:
    """The image file of a LabelMe file, or None (missing_image / unsafe_path policy applied)."""
    beside = os.path.join(path.parent, image_path.replace("\\", "/"))
    under = os.path.join(img_dir, os.path.basename(image_path.replace("\\", "/")))
    for candidate in (beside, under):
        if os.path.isfile(candidate) and not leaves_folder(str(img_dir), candidate):
            return candidate
    if os.path.isfile(beside):
        labels.handle("unsafe_path", path, "imagePath", f"{brief(image_path)} leads outside img_dir '{img_dir}'")
    else:
        labels.handle("missing_image", path, "imagePath", f"a label file without its image: neither '{beside}' nor "
                      f"'{under}' exists")
    return None


def _size(path: Path, data: dict) -> tuple[int, int]:
    width, height = data.get("imageWidth"), data.get("imageHeight")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 1 <= v < 1e6
               for v in (width, height)):
        raise UserError(f"{path}: imageWidth and imageHeight must be positive numbers of pixels, got "
                        f"{brief(width)} x {brief(height)}.")
    return int(width), int(height)
