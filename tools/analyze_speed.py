"""Time of the AP error breakdown of `rcnn-eval --analyze` on a generated COCO-like file:
C classes, N images of 7 boxes each, one detection near each box (of its class 70% of the
time), scored by the current rcnn_trainer/analysis/errors.py and, with --old, an older copy
of it beside (the same breakdown must come out of both).

  git show REV:rcnn_trainer/analysis/errors.py > /tmp/errors_old.py
  python tools/analyze_speed.py 80 5000 --old /tmp/errors_old.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import random
import time

from pycocotools.coco import COCO

from rcnn_trainer.analysis import errors


def generated(num_classes: int, num_images: int, seed: int = 0) -> tuple[COCO, list[dict]]:
    rng = random.Random(seed)
    cats = [{"id": i, "name": f"c{i}", "supercategory": f"s{i % 8}"} for i in range(1, num_classes + 1)]
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.png"} for i in range(1, num_images + 1)]
    anns, results = [], []
    for image in images:
        for _ in range(7):
            x, y, w, h = rng.uniform(0, 500), rng.uniform(0, 400), rng.uniform(5, 100), rng.uniform(5, 80)
            cat = rng.randint(1, num_classes)
            anns.append({"id": len(anns) + 1, "image_id": image["id"], "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            detected = cat if rng.random() < 0.7 else rng.randint(1, num_classes)
            results.append({"image_id": image["id"], "category_id": detected, "score": rng.random(),
                            "bbox": [x + rng.gauss(0, 5), y + rng.gauss(0, 5), w, h]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": cats}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("classes", type=int)
    p.add_argument("images", type=int)
    p.add_argument("--old", help="an older errors.py to time beside the current one")
    args = p.parse_args()
    gt, results = generated(args.classes, args.images)
    names = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    modules = {"current": errors}
    if args.old:
        spec = importlib.util.spec_from_file_location("errors_old", args.old)
        modules["old"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules["old"])
    breakdowns = {}
    for name, module in modules.items():
        t0 = time.perf_counter()
        breakdowns[name] = module.error_breakdown(gt, results, sorted(gt.imgs), names)["per_class"]
        print(f"{name}: {time.perf_counter() - t0:.1f} s")
    if args.old:
        print("same breakdown" if breakdowns["old"] == breakdowns["current"] else "DIFFERENT breakdowns")


if __name__ == "__main__":
    main()
