"""Memory and time of the mask data path on a dataset with many objects, in one run.

Generates a COCO file of --images 640 x 480 images with Poisson(--objects) objects each, every
object a 16-point polygon (as COCO's), and measures in fresh subprocesses: the index without
masks, the index with masks (every segmentation checked), and the index with masks plus
loading --load images (rasterized per image, as training does). Prints time and peak RSS, and
what holding one full-image mask per object would take instead.

--large measures the other bound instead: one --large-side x --large-side image with
--large-objects objects (half polygons, half compressed RLEs), loaded once with masks on at the
default training size (800 - 1333 px), against the same process doing nothing but the imports.

    python tools/mask_memory.py --images 20000 --objects 7.3 --out /tmp/mask_memory
    python tools/mask_memory.py --large --out /tmp/mask_memory_large
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

MEASURE = {
    "index, boxes only": "CocoDetection(ann, img_dir, check_images=0)",
    "index, masks on": "CocoDetection(ann, img_dir, check_images=0, masks=True)",
    "index + load images, masks on": "d = CocoDetection(ann, img_dir, check_images=0, masks=True)\n"
                                     "for i in range(LOAD): d[i]",
}


def generate(out: Path, images: int, objects: float, seed: int = 0) -> tuple[Path, int]:
    from PIL import Image

    ann_file = out / "instances.json"
    if ann_file.exists():
        return ann_file, len(json.loads(ann_file.read_text())["annotations"])
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    source = out / "one.png"
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(source)
    anns = []
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    for image_id in range(1, images + 1):
        link = out / "images" / f"{image_id:012d}.png"
        if not link.exists():
            os.link(source, link) if image_id % 60000 else Image.open(source).save(link)
        for _ in range(rng.poisson(objects)):
            w, h = rng.uniform(8, 300), rng.uniform(8, 300)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            poly = np.stack([x + w / 2 * (1 + np.cos(angles)), y + h / 2 * (1 + np.sin(angles))], 1)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 81)),
                         "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "area": w * h, "iscrowd": 0,
                         "segmentation": [np.round(poly.ravel(), 2).tolist()]})
    data = {"images": [{"id": i, "file_name": f"{i:012d}.png", "width": 640, "height": 480}
                       for i in range(1, images + 1)],
            "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 81)]}
    ann_file.write_text(json.dumps(data))
    return ann_file, len(anns)


LARGE = {
    "imports only (baseline)": "pass",
    "load the image, masks on": "from rcnn_trainer.data.transforms import build_transforms\n"
                                "d = CocoDetection(ann, img_dir, check_images=0, masks=True, "
                                "transforms=build_transforms(800, 1333, 0.0, train=True))\n"
                                "image, target = d[0]\nprint('masks', tuple(target['masks'].shape))",
}


def generate_large(out: Path, side: int, objects: int, seed: int = 0) -> Path:
    """One flat grey side x side PNG (small on disk) with `objects` objects of 5-20 % of the side."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    ann_file = out / "instances.json"
    if ann_file.exists():
        return ann_file
    (out / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (side, side), (128, 128, 128)).save(out / "images" / "big.png")
    rng = np.random.default_rng(seed)
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    anns = []
    for k in range(objects):
        w, h = rng.uniform(0.05, 0.2, 2) * side
        x, y = rng.uniform(0, side - w), rng.uniform(0, side - h)
        poly = np.stack([x + w / 2 * (1 + np.cos(angles)), y + h / 2 * (1 + np.sin(angles))], 1).ravel().tolist()
        segmentation = [poly]
        if k % 2:  # the same shape as a compressed RLE
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, side, side))
            segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        anns.append({"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [x, y, w, h], "area": w * h,
                     "iscrowd": 0, "segmentation": segmentation})
    ann_file.write_text(json.dumps({"images": [{"id": 1, "file_name": "big.png", "width": side, "height": side}],
                                    "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return ann_file


def measure(statement: str, ann: Path, load: int) -> tuple[float, float]:
    script = (f"import resource, time; from rcnn_trainer.data.coco import CocoDetection\n"
              f"ann, img_dir, LOAD = {str(ann)!r}, {str(ann.parent / 'images')!r}, {load}\n"
              f"t = time.perf_counter()\n{statement}\n"
              f"print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    seconds, gib = out.stdout.split()[-2:]
    return float(seconds), float(gib)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--objects", type=float, default=7.3)
    p.add_argument("--load", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("/tmp/mask_memory"))
    p.add_argument("--large", action="store_true", help="Measure one large image with many objects instead.")
    p.add_argument("--large-side", type=int, default=4000)
    p.add_argument("--large-objects", type=int, default=100)
    args = p.parse_args()
    if args.large:
        ann = generate_large(args.out, args.large_side, args.large_objects)
        print(f"file: {ann} (one {args.large_side} x {args.large_side} image, {args.large_objects} objects)")
        for name, statement in LARGE.items():
            seconds, gib = measure(statement, ann, 1)
            print(f"{name:32s} {seconds:6.1f} s  peak RSS {gib:5.2f} GiB")
        full = args.large_objects * args.large_side ** 2 / 2**30
        print(f"the objects' masks at full size (uint8 {args.large_side} x {args.large_side}): {full:.2f} GiB")
        return
    ann, objects = generate(args.out, args.images, args.objects)
    print(f"file: {ann} ({ann.stat().st_size / 1e6:.0f} MB, {args.images} images, {objects} objects with polygons)")
    for name, statement in MEASURE.items():
        seconds, gib = measure(statement, ann, args.load)
        print(f"{name:32s} {seconds:6.1f} s  peak RSS {gib:5.2f} GiB")
    print(f"every object's full-image mask held at once (uint8 640 x 480): {objects * 640 * 480 / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
