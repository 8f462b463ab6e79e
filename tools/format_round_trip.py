"""The format round trip (issue 40): a COCO dataset written out as Pascal VOC, YOLO and LabelMe
(tools/write_label_formats.py) and read back by rcnn_trainer gives the same records, the same
masks and the same AP of one trained model.

Steps: the synthetic dataset of config.yaml (COCO); its class names prefixed by their id order
("1_square": VOC and LabelMe number classes by name, so one checkpoint then reads every format
alike; the boxes are untouched; the records are also compared on a copy whose box edges are moved by random
fractions of a pixel, which the rounding rules must keep within 1e-3 px); one model trained on the COCO train split (config.yaml, --iters); each split
written as VOC, YOLO (boxes; a dataset yaml over linked images) and LabelMe (rectangles); each read
back and compared with the COCO records image by image (file name, class name, box: the largest
corner difference in px); YOLO and LabelMe written again with polygons and their masks rasterized
against the COCO ones (pixels that differ); then rcnn-eval of the one checkpoint on the val split
in each format (AP, AP50, seconds).

    flock /tmp/heavy.lock python tools/format_round_trip.py --out /tmp/round_trip --iters 300
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from write_label_formats import write_labelme, write_voc, write_yolo  # noqa: E402

from rcnn_trainer.cli import eval_main, train_main  # noqa: E402
from rcnn_trainer.data.coco import CocoDetection  # noqa: E402
from rcnn_trainer.data.labels import read_labels  # noqa: E402
from rcnn_trainer.data.masks import rasterize  # noqa: E402
from rcnn_trainer.data.records import DropReport, RecordPolicy  # noqa: E402
from rcnn_trainer.data.synthetic import ensure_synthetic_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def renamed(src: Path, dst: Path) -> Path:
    """The COCO file with each class name prefixed by its position in category id order ("1_square"):
    VOC and LabelMe number classes by name, COCO and YOLO by id; with these names all four number
    them alike, so one checkpoint (trained on the original file, or on this one) reads every format."""
    coco = json.loads(src.read_text())
    for k, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]), 1):
        c["name"] = f"{k}_{c['name']}"
    dst.write_text(json.dumps(coco))
    return dst


def jittered(src: Path, dst: Path, seed: int = 0) -> Path:
    """The COCO file with every box edge moved inward by a random fraction of a pixel (seeded): the
    synthetic boxes have one decimal, which any writer keeps exactly; these test the rounding rules."""
    coco, rng = json.loads(src.read_text()), np.random.default_rng(seed)
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        dx0, dy0, dx1, dy1 = rng.uniform(0, 0.45, 4)
        ann["bbox"] = [x + dx0, y + dy0, w - dx0 - dx1, h - dy0 - dy1]
    dst.write_text(json.dumps(coco))
    return dst


def write_all(coco_file: Path, img_dir: Path, out: Path, polygons: bool) -> dict[str, tuple[Path, Path | None]]:
    """{format: (ann_file, img_dir)} of the split written in each format."""
    coco = json.loads(coco_file.read_text())
    yaml_file = write_yolo(coco, out / "yolo", polygons=polygons, img_dir=img_dir).parent / "data.yaml"
    return {"voc": (write_voc(coco, out / "voc"), img_dir), "yolo": (yaml_file, None),
            "labelme": (write_labelme(coco, out / "labelme", img_dir, polygons=polygons), img_dir)}


def read_back(ann_file: Path, img_dir: Path | None, fmt: str, split: str) -> CocoDetection:
    report = DropReport()
    raw, folder = read_labels(ann_file, img_dir, fmt, split, RecordPolicy(), report)
    return CocoDetection(ann_file, folder, raw=raw, report=report)


def compare_records(ref: CocoDetection, back: CocoDetection) -> dict:
    """Images, objects, mismatches (file / count / class) and the largest box difference in px."""
    theirs = {Path(r.file).name: r for r in back.records}
    worst, mismatches, objects = 0.0, 0, 0
    for r in ref.records:
        b = theirs.get(Path(r.file).name)
        names_a = [ref.class_names[i - 1] for i in r.labels]
        if b is None or names_a != [back.class_names[i - 1] for i in b.labels]:
            mismatches += 1
            continue
        objects += len(r.labels)
        if len(r.labels):  # the boxes as read (float64 [x, y, w, h]), before the records' float32
            box_a = np.array([ref.raw["annotations"][row]["bbox"] for row in r.rows.tolist()], np.float64)
            box_b = np.array([back.raw["annotations"][row]["bbox"] for row in b.rows.tolist()], np.float64)
            worst = max(worst, float(np.abs(box_a - box_b).max()))
    return {"images": len(ref.records), "images_back": len(back.records), "objects": objects,
            "mismatched_images": mismatches, "max_box_diff_px": worst}


def compare_masks(ref: CocoDetection, back: CocoDetection) -> dict:
    """Pixels whose mask value differs, over all objects (polygons rasterized by pycocotools)."""
    theirs = {Path(r.file).name: r for r in back.records}
    differing = total = 0
    for r in ref.records:
        b = theirs[Path(r.file).name]
        segs_a = [ref.raw["annotations"][row]["segmentation"] for row in r.rows.tolist()]
        segs_b = [back.raw["annotations"][row]["segmentation"] for row in b.rows.tolist()]
        size = (r.height, r.width)
        mask_a, mask_b = rasterize(segs_a, r.height, r.width, size), rasterize(segs_b, b.height, b.width, size)
        differing += int((mask_a != mask_b).sum())
        total += int(mask_a.sum())
    return {"mask_pixels": total, "differing_pixels": differing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--records-only", action="store_true", help="Only the records and masks (seconds; no model).")
    parser.add_argument("--checkpoint", type=Path, help="Evaluate this checkpoint of a config.yaml run on the "
                        "synthetic data instead of training one (its classes in category id order).")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out) if (args.out / "round_trip.json").exists() else sys.exit(f"{args.out} exists")
    args.out.mkdir(parents=True)
    synthetic = ensure_synthetic_dataset(300, 60, 128, 0, args.out / "cache")
    images = (synthetic / "images").resolve()
    coco = {s: renamed(synthetic / f"{s}.json", args.out / f"{s}.json") for s in ("train", "val")}
    result: dict = {"records": {}, "masks": {}, "eval": {}}
    for split in ("train", "val"):
        ref = CocoDetection(coco[split], images)
        for fmt, (ann, img_dir) in write_all(coco[split], images, args.out / "boxes" / split, False).items():
            result["records"][f"{fmt}/{split}"] = compare_records(ref, read_back(ann, img_dir, fmt, split))
        moved = jittered(coco[split], args.out / f"{split}_jittered.json")
        ref = CocoDetection(moved, images)
        for fmt, (ann, img_dir) in write_all(moved, images, args.out / "jittered" / split, False).items():
            result["records"][f"{fmt}/{split} (sub-pixel boxes)"] = compare_records(
                ref, read_back(ann, img_dir, fmt, split))
        ref_masks = CocoDetection(coco[split], images, masks=True, load_masks=False)
        for fmt, (ann, img_dir) in write_all(coco[split], images, args.out / "polygons" / split, True).items():
            if fmt != "voc":  # VOC keeps no polygons
                result["masks"][f"{fmt}/{split}"] = compare_masks(ref_masks, read_back(ann, img_dir, fmt, split))
    print(json.dumps(result, indent=1), flush=True)
    if args.records_only:
        (args.out / "round_trip.json").write_text(json.dumps(result, indent=1))
        return
    run = args.out / "run"
    base = [f"data.train.ann_file={coco['train']}", f"data.train.img_dir={images}", "data.synthetic=null",
            f"data.val.ann_file={coco['val']}", f"data.val.img_dir={images}", f"output_dir={run}"]
    checkpoint = args.checkpoint
    if checkpoint is None:
        train_main(["--config", str(ROOT / "config.yaml"), "--no-progress", f"solver.max_iters={args.iters}", *base])
        checkpoint = run / "model_final.pth"
    result["checkpoint"] = str(checkpoint)
    splits = {"coco": (coco["val"], images), **write_all(coco["val"], images, args.out / "eval_val", False)}
    for fmt, (ann, img_dir) in splits.items():
        folder = args.out / f"eval_{fmt}"
        start = time.perf_counter()
        eval_main(["--config", str(ROOT / "config.yaml"), "--checkpoint", str(checkpoint),
                   "--output-dir", str(folder), "--no-progress", *base, f"data.val.ann_file={ann}",
                   f"data.val.img_dir={img_dir if img_dir is not None else 'null'}"])
        metrics = json.loads((folder / "metrics.json").read_text())
        result["eval"][fmt] = {"AP": metrics["AP"], "AP50": metrics["AP50"],
                               "seconds": round(time.perf_counter() - start, 2)}
    (args.out / "round_trip.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
