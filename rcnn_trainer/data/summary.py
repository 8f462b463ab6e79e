"""A dataset summary printed at start: what was loaded, what was dropped and why."""

from __future__ import annotations

import numpy as np

from rcnn_trainer.data.coco import CocoDetection

SIZE_BUCKETS = [("small <32", 0, 32), ("medium 32-96", 32, 96), ("large >=96", 96, float("inf"))]


def summarize_dataset(dataset: CocoDetection, name: str) -> dict:
    """Numbers about a loaded split (original image coordinates)."""
    per_image = np.array([len(r.labels) for r in dataset.records], dtype=np.int64)
    labels = np.concatenate([r.labels for r in dataset.records]) if dataset.records else np.zeros(0, np.int64)
    boxes = np.concatenate([r.boxes for r in dataset.records]) if dataset.records else np.zeros((0, 4), np.float32)
    sides = np.sqrt(np.clip((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0, None))
    return {
        "split": name,
        "file": str(dataset.ann_file),
        "images": len(dataset.records),
        "images_in_file": len(dataset.raw["images"]),
        "objects": int(per_image.sum()),
        "objects_per_image": float(per_image.mean()) if len(per_image) else 0.0,
        "empty_images": int((per_image == 0).sum()),
        "crowd_ignored": int(sum(r.num_crowd for r in dataset.records)),
        "class_counts": {dataset.class_names[i]: int((labels == i + 1).sum()) for i in range(dataset.num_classes)},
        "box_sizes": {bucket: int(((sides >= lo) & (sides < hi)).sum()) for bucket, lo, hi in SIZE_BUCKETS},
        "dropped": dict(dataset.report.counts),
    }


def format_summary(summary: dict, dataset: CocoDetection) -> str:
    s = summary
    lines = [
        f"[data] {s['split']}: {s['images']} images ({s['images_in_file']} in {s['file']}), "
        f"{s['objects']} objects, {s['objects_per_image']:.2f} per image, {s['empty_images']} without objects"
        + (f", {s['crowd_ignored']} crowd boxes ignored" if s["crowd_ignored"] else ""),
        "[data]   classes: " + ", ".join(f"{k} {v}" for k, v in s["class_counts"].items()),
        "[data]   box sizes (sqrt area, px): " + ", ".join(f"{k} {v}" for k, v in s["box_sizes"].items()),
    ]
    if s["dropped"]:
        lines.append("[data]   WARNING dropped or fixed records:")
        lines += [f"[data]     {line}" for line in dataset.report.lines()]
    return "\n".join(lines)
