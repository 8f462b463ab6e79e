"""Index a COCO-size annotation file: rcnn_trainer's CocoDetection and `rcnn-train --preflight`
vs pycocotools' COCO(), one run.

Generates a file shaped like COCO train2017 (118,000 images, ~860,000 boxes, 80 classes) with one
small PNG hard-linked under every file name, then indexes it in fresh subprocesses (one per
loader, so peak RSS is each loader's own) and prints time and peak memory side by side. The
preflight row is the whole `rcnn-train --preflight` on that file as the training split and a
5,000-image file of the same kind as val (COCO val2017's size): both indexes, the auto
settings, the dataset summaries and every preflight check.

    python tools/coco_index_bench.py --images 118000 --boxes-per-image 7.3 --out /tmp/coco_bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# (imports, timed statement): imports are outside the timing; memory is the peak RSS of the
# process and that peak minus the RSS after the imports (torch alone is ~0.4 GiB)
MEASURE = {
    "pycocotools COCO()": ("from pycocotools.coco import COCO", "COCO(ann)"),
    "rcnn_trainer CocoDetection": ("from rcnn_trainer.data.coco import CocoDetection",
                                   "CocoDetection(ann, img_dir, check_images=256)"),
    # the modules the command imports lazily (torch, torchvision, the model) are imported first as
    # well: what is timed is the index plus every preflight check, as pycocotools' import is not timed
    "rcnn-train --preflight": ("from rcnn_trainer.cli import train_main; import rcnn_trainer.train.run_setup, "
                               "rcnn_trainer.data.summary, rcnn_trainer.monitor.preflight",
                               "train_main(['--config', ann.replace('instances.json', 'preflight.yaml'), '--preflight'])"),
}
REPO = Path(__file__).resolve().parents[1]


def preflight_config(out: Path, train_ann: Path, val_ann: Path) -> Path:
    """config.yaml with the generated files as its data (train: the big one, val: 5,000 images)."""
    import yaml

    config = out / "preflight.yaml"
    config.write_text(yaml.safe_dump({
        "_base_": str(REPO / "config.yaml"), "output_dir": str(out / "run"),
        "data": {"train": {"ann_file": str(train_ann), "img_dir": str(out / "images")},
                 "val": {"ann_file": str(val_ann), "img_dir": str(val_ann.parent / "images")},
                 "min_size": 480, "max_size": 640}}))
    return config


def generate(out: Path, images: int, boxes_per_image: float, seed: int = 0) -> Path:
    from PIL import Image

    ann_file = out / "instances.json"
    if ann_file.exists():
        return ann_file
    rng = np.random.default_rng(seed)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    counts = rng.poisson(boxes_per_image, images)
    anns, next_id = [], 1
    for image_id, n in enumerate(counts, start=1):
        link = img_dir / f"{image_id:012d}.png"
        source = out / f"one_{image_id // 60000}.png"  # a file takes at most 65,000 hard links
        if not source.exists():
            Image.fromarray(pixels).save(source)
        if not link.exists():
            os.link(source, link)
        w, h = rng.uniform(4, 300, n), rng.uniform(4, 300, n)
        x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
        for k in range(n):
            box = [round(float(x[k]), 2), round(float(y[k]), 2), round(float(w[k]), 2), round(float(h[k]), 2)]
            anns.append({"id": next_id, "image_id": image_id, "category_id": int(rng.integers(1, 81)), "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0, "segmentation": []})
            next_id += 1
    data = {"images": [{"id": i, "file_name": f"{i:012d}.png", "width": 640, "height": 480}
                       for i in range(1, images + 1)],
            "annotations": anns, "categories": [{"id": c, "name": f"class{c}", "supercategory": "x"}
                                                 for c in range(1, 81)]}
    ann_file.write_text(json.dumps(data))
    return ann_file


def measure(code: tuple[str, str], ann: Path, img_dir: Path) -> tuple[float, float, float]:
    imports, statement = code
    script = (f"import resource, time, contextlib, io; {imports}; ann, img_dir = {str(ann)!r}, {str(img_dir)!r}\n"
              f"rss = lambda: int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize() / 2**30\n"
              f"base = rss(); t = time.perf_counter()\n"
              f"with contextlib.redirect_stdout(io.StringIO()): x = {statement}\n"
              f"if isinstance(x, int) and x != 0: raise SystemExit(f'exit {{x}}')  # a CLI that failed is no figure\n"
              f"peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20\n"
              f"print(time.perf_counter() - t, peak, peak - base)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    seconds, gib, own = out.stdout.split()[-3:]
    return float(seconds), float(gib), float(own)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=118000)
    p.add_argument("--boxes-per-image", type=float, default=7.3)
    p.add_argument("--out", type=Path, default=Path("/tmp/coco_index_bench"))
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    started = time.perf_counter()
    ann = generate(args.out, args.images, args.boxes_per_image)
    val = generate(args.out / "val", 5000, args.boxes_per_image, seed=1)
    preflight_config(args.out, ann, val)
    size_mb = ann.stat().st_size / 1e6
    print(f"file: {ann} ({size_mb:.0f} MB, {args.images} images; generated in {time.perf_counter() - started:.0f} s)")
    results = {}
    for _ in range(args.repeats):
        for name, code in MEASURE.items():
            run = measure(code, ann, args.out / "images")
            best = results.get(name)
            results[name] = tuple(min(a, b) for a, b in zip(run, best)) if best else run
    ref_t, ref_mem, ref_own = results["pycocotools COCO()"]
    for name, (t, mem, own) in results.items():
        print(f"{name:28s} {t:7.1f} s  peak RSS {mem:5.2f} GiB (indexing {own:5.2f})  time ratio {t / ref_t:.2f}  "
              f"peak ratio {mem / ref_mem:.2f}  indexing-memory ratio {own / ref_own:.2f}")


if __name__ == "__main__":
    main()
