"""Write a COCO dataset out as Pascal VOC XML, YOLO txt and LabelMe JSON (the labels only; the
images stay where they are): the other half of the format round trip (tools/format_round_trip.py)
and a way to hand a COCO dataset to tools that read those formats.

Rounding rules (docs/formats.md): VOC corners are written as floats with 6 decimals,
xmin = x + 1, ymin = y + 1, xmax = x + w, ymax = y + h (1-based inclusive pixels; `--integer-voc`
rounds them to integers as LabelImg writes them: up to 0.5 px off); YOLO centres and sizes are
normalized with 9 decimals (under 1e-5 px at 10,000 px); LabelMe points with 6 decimals. Crowd
annotations are left out (none of the three has them); VOC keeps no polygons; YOLO writes an
object's largest polygon (`--polygons`), LabelMe all of them under one group_id.

    python tools/write_label_formats.py COCO.json IMG_DIR OUT [--polygons] [--integer-voc]
writes OUT/voc/Annotations/*.xml, OUT/yolo/labels/*.txt (+ classes.txt; OUT/yolo/images/ links to the
images and OUT/yolo/data.yaml) and OUT/labelme/*.json (imagePath relative to each json), each named
after the image's file name.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from xml.sax.saxutils import escape


def _stem(file_name: str) -> str:
    """The image's file name without its suffix, refused when it would leave the output folder."""
    if os.path.isabs(file_name) or ".." in Path(file_name).parts or "\0" in file_name:
        raise ValueError(f"file_name {file_name!r} would leave the output folder")
    return str(Path(file_name).with_suffix(""))


def _by_image(coco: dict) -> dict:
    anns: dict = {image["id"]: [] for image in coco["images"]}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd") and ann["image_id"] in anns:
            anns[ann["image_id"]].append(ann)
    return anns


def _num(value: float, decimals: int = 6) -> str:
    return f"{value:.{decimals}f}".rstrip("0").rstrip(".")


def write_voc(coco: dict, out: Path, integer: bool = False) -> Path:
    """OUT/Annotations/<stem>.xml per image; returns the Annotations folder."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    folder = out / "Annotations"
    anns = _by_image(coco)
    for image in coco["images"]:
        objects = []
        for ann in anns[image["id"]]:
            x, y, w, h = ann["bbox"]
            corners = [x + 1, y + 1, x + w, y + h]
            text = [str(round(v)) if integer else _num(v) for v in corners]
            objects.append(f"  <object>\n    <name>{escape(names[ann['category_id']])}</name>\n"
                           f"    <difficult>{int(ann.get('difficult', 0))}</difficult>\n    <bndbox>"
                           + "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), text))
                           + "</bndbox>\n  </object>\n")
        path = folder / f"{_stem(image['file_name'])}.xml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"<annotation>\n  <filename>{escape(image['file_name'])}</filename>\n  <size><width>"
                        f"{image['width']}</width><height>{image['height']}</height><depth>3</depth></size>\n"
                        + "".join(objects) + "</annotation>\n")
    return folder


def write_yolo(coco: dict, out: Path, polygons: bool = False, img_dir: Path | None = None) -> Path:
    """OUT/labels/<stem>.txt per image and OUT/labels/classes.txt; returns the labels folder.
    Class index = the category's position in id order. With `img_dir`: Ultralytics' layout too,
    OUT/images/<file_name> linked to the images and OUT/data.yaml (train and val: images)."""
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    folder = out / "labels"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("".join(f"{c['name']}\n" for c in categories))
    if img_dir is not None:
        for image in coco["images"]:
            link = out / "images" / image["file_name"]
            _stem(image["file_name"])
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(img_dir).resolve() / image["file_name"])
        (out / "data.yaml").write_text(json.dumps({"path": ".", "train": "images", "val": "images",
                                                   "names": [c["name"] for c in categories]}))
    anns = _by_image(coco)
    for image in coco["images"]:
        w, h = image["width"], image["height"]
        lines = []
        for ann in anns[image["id"]]:
            segmentation = ann.get("segmentation")
            if polygons and isinstance(segmentation, list) and segmentation:
                flat = max(segmentation, key=len)
                coords = [v / (w if k % 2 == 0 else h) for k, v in enumerate(flat)]
                lines.append(f"{index[ann['category_id']]} " + " ".join(_num(v, 9) for v in coords))
                continue
            x, y, bw, bh = ann["bbox"]
            values = [(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]
            lines.append(f"{index[ann['category_id']]} " + " ".join(_num(v, 9) for v in values))
        path = folder / f"{_stem(image['file_name'])}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines))
    return folder


def write_labelme(coco: dict, out: Path, img_dir: Path, polygons: bool = False) -> Path:
    """OUT/<stem>.json per image, imagePath relative to the json's folder; returns OUT."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    anns = _by_image(coco)
    for image in coco["images"]:
        path = out / f"{_stem(image['file_name'])}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        shapes = []
        for group, ann in enumerate(anns[image["id"]]):
            segmentation = ann.get("segmentation")
            if polygons and isinstance(segmentation, list) and segmentation:
                for flat in segmentation:
                    points = [[float(_num(flat[k])), float(_num(flat[k + 1]))] for k in range(0, len(flat) - 1, 2)]
                    shapes.append({"label": names[ann["category_id"]], "points": points, "shape_type": "polygon",
                                   "group_id": group if len(segmentation) > 1 else None, "flags": {}})
                continue
            x, y, w, h = ann["bbox"]
            shapes.append({"label": names[ann["category_id"]], "shape_type": "rectangle", "group_id": None,
                           "points": [[float(_num(x)), float(_num(y))], [float(_num(x + w)), float(_num(y + h))]],
                           "flags": {}})
        image_path = os.path.relpath(Path(img_dir) / image["file_name"], path.parent)
        path.write_text(json.dumps({"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image_path,
                                    "imageData": None, "imageHeight": image["height"], "imageWidth": image["width"]}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("coco", type=Path)
    parser.add_argument("img_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--polygons", action="store_true", help="YOLO and LabelMe objects as polygons (masks).")
    parser.add_argument("--integer-voc", action="store_true", help="VOC corners rounded to integers.")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty; give a new folder.")
    coco = json.loads(args.coco.read_text())
    print("voc:", write_voc(coco, args.out / "voc", integer=args.integer_voc))
    print("yolo:", write_yolo(coco, args.out / "yolo", polygons=args.polygons, img_dir=args.img_dir))
    print("labelme:", write_labelme(coco, args.out / "labelme", args.img_dir.resolve(), polygons=args.polygons))


if __name__ == "__main__":
    main()
