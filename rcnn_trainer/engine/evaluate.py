"""COCO evaluation with pycocotools, plus the threshold-count table.

Predictions are mapped back to original image coordinates and category ids, written as a
COCO results list, and scored against the original annotation file (so crowd regions and
everything else follow the official evaluation).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from tqdm import tqdm

from rcnn_trainer.data.coco import CocoDetection
from rcnn_trainer.engine.distributed import all_gather_objects, broadcast_from_main, is_main_process
from rcnn_trainer.monitor.threshold_counts import threshold_counts

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, progress: bool = True,
            autocast=contextlib.nullcontext) -> list[tuple[int, dict]]:
    """(image_id, detections in original image coordinates) for every image of the loader."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
            images = [img.to(device, non_blocking=True) for img in images]
            with autocast():
                detections = model(images, original_sizes=[t["orig_size"] for t in targets])
            for target, det in zip(targets, detections):
                out.append((target["image_id"], {k: v.float().cpu() if v.is_floating_point() else v.cpu()
                                                 for k, v in det.items()}))
    finally:
        model.train(was_training)
    return out


def to_coco_results(predictions: list[tuple[int, dict]], label_to_cat_id: dict[int, int]) -> list[dict]:
    results = []
    for image_id, det in predictions:
        boxes = det["boxes"].tolist()
        for (x0, y0, x1, y1), label, score in zip(boxes, det["labels"].tolist(), det["scores"].tolist()):
            results.append({"image_id": int(image_id), "category_id": label_to_cat_id[int(label)],
                            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                            "score": round(float(score), 5)})
    return results


def coco_metrics(dataset: CocoDetection, results: list[dict]) -> dict:
    """AP, AP50, AP75, APs/m/l, AR@1/10/100 and per-class AP (all in [0, 1]; -1 = undefined)."""
    from pycocotools.cocoeval import COCOeval

    coco_gt = dataset.coco_api()
    image_ids = [r.image_id for r in dataset.records]
    metrics = {name: 0.0 for name in STAT_NAMES}
    metrics["per_class_AP"] = {name: 0.0 for name in dataset.class_names}
    if not results:  # pycocotools cannot load an empty result list; nothing detected scores 0
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics.update({name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)})
    precision = evaluator.eval["precision"]  # [T iou, R recall, K class, A area, M maxdets]
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        name = dataset.class_names[dataset.cat_id_to_label[cat_id] - 1]
        metrics["per_class_AP"][name] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    return metrics


def format_metrics(metrics: dict) -> str:
    main = "  ".join(f"{k} {metrics[k]:.3f}" for k in ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"])
    per_class = "  ".join(f"{name} {ap:.3f}" for name, ap in metrics.get("per_class_AP", {}).items())
    return f"  {main}\n  per-class AP: {per_class}"


def evaluate(model, dataset: CocoDetection, loader, device, thresholds: list[float],
             progress: bool = True, autocast=contextlib.nullcontext) -> tuple[dict, list[dict]]:
    """Run the model on a split; returns (metrics, COCO results)."""
    predictions = predict(model, loader, device, progress=progress, autocast=autocast)
    # Under DDP each rank predicted its shard of the images: gather them, score once on rank 0.
    predictions = [p for shard in all_gather_objects(predictions) for p in shard]
    metrics, results = None, []
    if is_main_process():
        results = to_coco_results(predictions, dataset.label_to_cat_id)
        metrics = coco_metrics(dataset, results)
        gt_per_image = float(np.mean([len(r.labels) for r in dataset.records])) if dataset.records else 0.0
        metrics["threshold_counts"] = threshold_counts(predictions, thresholds, gt_per_image)
    return broadcast_from_main(metrics), results
