"""YOLO txt labels: one file per image, one object per line, `class cx cy w h` normalized to the
image size, or `class x1 y1 x2 y2 ... xn yn` (a normalized polygon: segmentation).

`ann_file` is a dataset yaml (Ultralytics: `path`, `train`, `val`, `names`; the split read is the
config section's, `data.train` -> `train`) or a labels folder. With a yaml, each split entry is an
images folder, a .txt list of image paths or one image (relative to `path`, which is relative to
the yaml's folder; default that folder), and each image's labels are found as Ultralytics finds
them: its path with the last `images` folder replaced by `labels` and the suffix by .txt. img_dir
defaults to `path`. With a labels folder, img_dir is the images folder: `labels/a/b.txt` labels
the image `img_dir/a/b.<any image suffix>`.

Class names: the yaml's `names` (a list, or a mapping index -> name), or for a labels folder a
`classes.txt` / `obj.names` in it or up to two folders above (LabelImg and CVAT write them);
without one the classes are named by their index, 0 .. the largest index in the split.
An image without a label file is a negative (YOLO's convention: background only); it is counted
in the load report. The image size comes from its header (sizes are not in the labels).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from rcnn_trainer.data.labels.builder import (IMAGE_SUFFIXES, LabelSet, image_sizes, images_by_stem,
                                              leaves_folder, list_files)
from rcnn_trainer.data.records import DropReport, RecordChecks, RecordPolicy
from rcnn_trainer.errors import UserError
from rcnn_trainer.input_limits import (MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, MAX_LABEL_FILE_BYTES,
                                       brief, check_file_size, check_nesting)

NAME_FILES = ("classes.txt", "obj.names")
MAX_UNNAMED_CLASSES = 10_000  # classes named by their index when no list names them


def read_yolo(ann_file: Path, img_dir: Path | None, split: str, policy: RecordPolicy, report: DropReport
              ) -> tuple[dict, Path]:
    """(the split as a COCO dict, the folder its file names are relative to)."""
    if ann_file.suffix.lower() in (".yaml", ".yml"):
        images, label_of, names, img_dir, label_dirs = _from_yaml(ann_file, img_dir, split)
    else:
        if img_dir is None:
            raise UserError(f"data.{split}.img_dir is needed with the YOLO labels folder '{ann_file}' (the images "
                            f"folder it labels).")
        by_stem = images_by_stem(img_dir)
        images = [Path(p) for p in by_stem.values()]
        label_of = {p: ann_file / f"{stem}.txt" for stem, p in zip(by_stem, images)}
        names, label_dirs = _names_file(ann_file), [ann_file]
    images = _inside(images, img_dir, ann_file, RecordChecks(ann_file, policy, report, {}))
    parsed = {image: _parse_lines(label_of[image]) for image in images if label_of[image].is_file()}
    if names is None:  # no class list: the indices found
        top = max((cls for rows in parsed.values() for _, cls, _ in rows), default=0)
        if top >= MAX_UNNAMED_CLASSES:
            raise UserError(f"{ann_file}: a label uses class {top} and no class list names the classes; give "
                            f"'names' in a dataset yaml or a classes.txt beside the labels.")
        names = [str(i) for i in range(top + 1)]
    labels = LabelSet(policy, report, names, first_id=0)
    _orphan_labels(label_dirs, set(label_of.values()), labels)
    for image_path, size in zip(images, image_sizes([str(p) for p in images])):
        label = label_of[image_path]
        if isinstance(size, str):
            labels.handle("missing_image", image_path, "the image header", size)
            continue
        image_id = os.path.relpath(image_path, img_dir).replace(os.sep, "/")
        image = labels.add_image(image_id, str(image_path), str(img_dir), *size, label if image_path in parsed else None)
        if image_path not in parsed:
            labels.report.add("image without a label file: used as a negative (YOLO's convention)", str(image_path))
            continue
        for number, cls, values in parsed[image_path]:
            _add_line(labels, image, label, number, cls, values, len(names))
    return labels.coco(), img_dir


def _inside(images: list[Path], img_dir: Path, ann_file: Path, checks: RecordChecks) -> list[Path]:
    """The images under img_dir; the others get the unsafe_path policy before anything of them
    (header, label file) is read."""
    kept = []
    for image in images:
        if leaves_folder(str(img_dir), str(image)):
            checks.handle("unsafe_path", f"image '{image}'", f"it lies outside img_dir '{img_dir}'")
        else:
            kept.append(image)
    return kept


def _add_line(labels: LabelSet, image: dict, label: Path, number: int, cls: int, values: list[float],
              num_names: int) -> None:
    where = f"line {number}"
    if not 0 <= cls < num_names:
        labels.handle("unknown_category", label, where, f"class {cls} is not one of the {num_names} classes "
                      f"(0..{num_names - 1})")
        return
    w, h = image["width"], image["height"]
    if len(values) == 4:
        cx, cy, bw, bh = values
        xyxy = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
        labels.add_object(image, cls, xyxy, label, where)
        return
    polygon = [v * (w if k % 2 == 0 else h) for k, v in enumerate(values)]
    xs, ys = polygon[0::2], polygon[1::2]
    labels.add_object(image, cls, [min(xs), min(ys), max(xs), max(ys)], label, where, polygons=[polygon])


def _parse_lines(label: Path) -> list[tuple[int, int, list[float]]]:
    """(line number, class, numbers) of each object line; a malformed line is a UserError naming it."""
    check_file_size(label, MAX_LABEL_FILE_BYTES, "YOLO label file")
    try:
        text = label.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{label}: cannot be read as text ({err}).") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        try:
            cls, values = int(words[0]), [float(w) for w in words[1:]]
        except ValueError:
            values = None
        if values is None or not (len(values) == 4 or (len(values) >= 6 and len(values) % 2 == 0)):
            raise UserError(f"{label}: line {number}: expected 'class cx cy w h' (a box) or 'class x1 y1 x2 y2 ... "
                            f"xn yn' (a polygon of 3 or more points), numbers normalized to the image, the class an "
                            f"integer; got {brief(line)}.")
        rows.append((number, cls, values))
    return rows


def _orphan_labels(label_dirs: list[Path], expected: set[Path], labels: LabelSet) -> None:
    """Label files with no image: the missing_image policy, naming the label file."""
    for folder in label_dirs:
        for path in list_files(folder, (".txt",)) if folder.is_dir() else []:
            if path not in expected and path.name not in NAME_FILES:
                labels.handle("missing_image", path, "the whole file", "a label file without its image (no image "
                              "with this name under img_dir)")


def _names_file(folder: Path) -> list[str] | None:
    for parent in [folder, *list(folder.resolve().parents)[:2]]:
        for name in NAME_FILES:
            if (parent / name).is_file():
                check_file_size(parent / name, MAX_CONFIG_BYTES, "class names file")
                text = (parent / name).read_text(encoding="utf-8", errors="replace")
                return [line.strip() for line in text.splitlines() if line.strip()]
    return None


def _from_yaml(path: Path, img_dir: Path | None, split: str):
    """(images, {image: label file}, names, img_dir, label folders) of the yaml's `split` entry."""
    spec = _read_yaml(path)
    root = path.parent / spec["path"] if isinstance(spec.get("path"), str) else path.parent
    entries = spec.get(split)
    if isinstance(entries, str):
        entries = [entries]
    if not (isinstance(entries, list) and entries and all(isinstance(e, str) for e in entries)):
        raise UserError(f"{path}: needs '{split}': an images folder, a .txt list of images or a list of them "
                        f"(relative to 'path'), for data.{split}; got {brief(spec.get(split))}.")
    images, label_dirs = [], []
    for entry in entries:
        target = root / entry
        if leaves_folder(str(root), str(target)):
            raise UserError(f"{path}: '{split}' names '{entry}', which leads outside the dataset root '{root}' "
                            f"(`path`); the split's images must lie under it.")
        if target.is_dir():
            images += list_files(target, IMAGE_SUFFIXES)
            if _label_path(target / "x").parent != target:  # labels beside the images: other .txt files may be there
                label_dirs.append(_label_path(target / "x").parent)
        elif target.suffix.lower() == ".txt" and target.is_file():
            check_file_size(target, MAX_LABEL_FILE_BYTES, "YOLO image list")
            lines = target.read_text(encoding="utf-8", errors="replace").splitlines()
            images += [root / line.strip() for line in lines if line.strip()]
        elif target.is_file():
            images.append(target)
        else:
            raise UserError(f"{path}: '{split}' names '{entry}', but '{target}' is neither an images folder, a .txt "
                            f"list nor an image.")
    return images, {p: _label_path(p) for p in images}, _yaml_names(spec, path), img_dir or root, label_dirs


def _label_path(image: Path) -> Path:
    """Ultralytics' rule: the last `images` folder of the path becomes `labels`, the suffix .txt."""
    parts = list(image.parts)
    if "images" in parts[:-1]:
        k = len(parts) - 2 - parts[-2::-1].index("images")
        parts[k] = "labels"
    return Path(*parts).with_suffix(".txt")


def _read_yaml(path: Path) -> dict:
    check_file_size(path, MAX_CONFIG_BYTES, "YOLO dataset yaml")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise UserError(f"{path}: not a readable YOLO dataset yaml ({str(err).splitlines()[0]}).") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: a YOLO dataset yaml is a mapping with path, train, val and names.")
    check_nesting(spec, str(path), MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, what="dataset yaml")
    return spec


def _yaml_names(spec: dict, path: Path) -> list[str] | None:
    names = spec.get("names")
    if names is None:
        return None
    if isinstance(names, dict) and all(isinstance(k, int) and not isinstance(k, bool) for k in names):
        if sorted(names) != list(range(len(names))):
            raise UserError(f"{path}: 'names' maps class indices to names; the indices must be 0..{len(names) - 1}, "
                            f"got {brief(sorted(names))}.")
        names = [names[k] for k in range(len(names))]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int)) for n in names):
        raise UserError(f"{path}: 'names' must be a list of class names (or a mapping index -> name), got {brief(names)}.")
    return [str(n) for n in names]


def is_yolo_labels_folder(folder: Path) -> bool:
    """A folder whose label files are .txt (auto-detection), class-name files aside."""
    for _, _, files in os.walk(folder):
        if any(f.endswith(".txt") and f not in NAME_FILES for f in files):
            return True
    return False
