"""Label formats other than a COCO json: Pascal VOC XML, YOLO txt and LabelMe JSON, each read
into the plain COCO dict (images / annotations / categories) that CocoDetection indexes, so that
training, evaluation (pycocotools on the converted records), --analyze and rcnn-convert share one
path. docs/formats.md says what each reader takes and how it converts.

`data.{train,val}.format: auto` picks the format by content (`detect_format`); a COCO json is read by
CocoDetection itself, as before.
"""

from __future__ import annotations

import os
from pathlib import Path

from rcnn_trainer.data.labels.labelme import labelme_names, read_labelme
from rcnn_trainer.data.labels.voc import read_voc, voc_names
from rcnn_trainer.data.labels.yolo import NAME_FILES, read_yolo
from rcnn_trainer.data.records import DropReport, RecordPolicy
from rcnn_trainer.errors import UserError

FORMATS = ("coco", "voc", "yolo", "labelme")
DESCRIBED = {"coco": "COCO json", "voc": "Pascal VOC XML", "yolo": "YOLO txt", "labelme": "LabelMe JSON"}
_DETECT_SAMPLE = 200  # label files looked at to tell a folder's format


def detect_format(ann_file: Path) -> str:
    """The format of `ann_file` by its content: a .json file -> coco, a .xml file or a .txt id list ->
    voc, a .yaml -> yolo; a folder by the label files it holds (.xml -> voc, .json -> labelme,
    .txt -> yolo; the most common of the first few hundred)."""
    ann_file = Path(ann_file)
    if ann_file.is_file():
        by_suffix = {".json": "coco", ".xml": "voc", ".txt": "voc", ".yaml": "yolo", ".yml": "yolo"}
        fmt = by_suffix.get(ann_file.suffix.lower())
        if fmt is None:
            raise UserError(f"cannot tell the label format of '{ann_file}' from its name: give a COCO .json, a VOC "
                            f".xml or ImageSets .txt, a YOLO dataset .yaml, or a folder; or set data.*.format.")
        return fmt
    counts = {"voc": 0, "labelme": 0, "yolo": 0}
    kind = {".xml": "voc", ".json": "labelme", ".txt": "yolo"}
    for _, dirs, files in os.walk(ann_file):
        dirs.sort()
        for name in files:
            fmt = kind.get(os.path.splitext(name)[1].lower())
            if fmt and name not in NAME_FILES:
                counts[fmt] += 1
        if sum(counts.values()) >= _DETECT_SAMPLE:
            break
    if not any(counts.values()):
        raise UserError(f"the folder '{ann_file}' holds no label file (.xml for VOC, .txt for YOLO, .json for "
                        f"LabelMe); set data.*.ann_file to the labels folder, a COCO json or a YOLO dataset yaml.")
    return max(counts, key=counts.get)


def read_labels(ann_file: Path, img_dir: Path | None, fmt: str, split: str, policy: RecordPolicy,
                report: DropReport, other: tuple[Path, str] | None = None) -> tuple[dict, Path]:
    """(the COCO dict of a VOC, YOLO or LabelMe split, the folder its file names are relative to).
    `other`: the other split's (ann_file, format), whose class names join this split's (VOC,
    LabelMe: the names are not listed anywhere else, and both splits must number them alike)."""
    ann_file = Path(ann_file)
    if fmt == "yolo":
        return read_yolo(ann_file, Path(img_dir) if img_dir is not None else None, split, policy, report)
    if img_dir is None:
        raise UserError(f"data.{split}.img_dir is needed with the {DESCRIBED[fmt]} labels '{ann_file}'.")
    other_names: set[str] = set()
    if other is not None and other[1] == fmt and Path(other[0]).resolve() != ann_file.resolve():
        other_names = (voc_names if fmt == "voc" else labelme_names)(Path(other[0]))
    if fmt == "voc":
        return read_voc(ann_file, Path(img_dir), policy, report, other_names), Path(img_dir)
    if fmt == "labelme":
        if not ann_file.is_dir():
            raise UserError(f"LabelMe labels are read from a folder of .json files; '{ann_file}' is not a folder.")
        return read_labelme(ann_file, Path(img_dir), policy, report, other_names), Path(img_dir)
    raise UserError(f"unknown label format {fmt!r}; one of {', '.join(FORMATS)}.")


def load_split(cfg, split: str, policy: RecordPolicy, report: DropReport, say=print) -> tuple[dict | None, Path]:
    """(the converted COCO dict, img_dir) of a config split in VOC, YOLO or LabelMe format, or (None,
    img_dir) for a COCO json (CocoDetection reads it) and the synthetic dataset; says which format it read."""
    source = None if cfg.data.synthetic is not None else getattr(cfg.data, split)
    if source is None:
        return None, None
    fmt = detect_format(source.ann_file) if source.format == "auto" else source.format
    if fmt == "coco":
        return None, source.img_dir
    other_split = getattr(cfg.data, "val" if split == "train" else "train")
    other = None
    if other_split is not None:
        other = (other_split.ann_file, other_split.format if other_split.format != "auto"
                 else detect_format(other_split.ann_file))
    raw, img_dir = read_labels(source.ann_file, source.img_dir, fmt, split, policy, report, other)
    how = "format: auto" if source.format == "auto" else f"data.{split}.format"
    say(f"[data] {split}: read {DESCRIBED[fmt]} labels from '{source.ann_file}' ({how}): {len(raw['images'])} images, "
        f"{len(raw['annotations'])} objects, {len(raw['categories'])} classes")
    return raw, img_dir


def class_order_warning(trained_names: list[str] | None, dataset) -> str | None:
    """A warning when a checkpoint's classes (label 1..C) are not the split's in the same order:
    VOC and LabelMe number classes by name, COCO by category id, YOLO by index, so a model trained
    on one format and scored on another may read class k as another class (and its AP means nothing)."""
    if not trained_names or list(trained_names) == list(dataset.class_names):
        return None
    return (f"[eval] WARNING the checkpoint was trained on the classes {list(trained_names)[:12]} (label 1, 2, ...) "
            f"but '{dataset.ann_file}' numbers its classes {list(dataset.class_names)[:12]}: each label is scored as "
            f"the split's class of that number. Evaluate on labels that number the classes alike "
            f"(docs/formats.md: categories of VOC and LabelMe are sorted by name).")

