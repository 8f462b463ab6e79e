"""COCO evaluation with pycocotools, plus the threshold-count table.

Predictions are mapped back to original image coordinates and category ids, written as a
COCO results list, and scored against the original annotation file (so crowd regions and
everything else follow the official evaluation). With a mask head, each detection's mask is
binarized at 0.5 and kept as COCO RLE (never as a full-image array: 100 per image would not fit),
and the segm metrics are scored beside the box ones.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from tqdm import tqdm

from rcnn_trainer.data.coco import CocoDetection
from rcnn_trainer.runtime.distributed import all_gather_objects, broadcast_from_main, is_main_process
from rcnn_trainer.monitor.threshold_counts import threshold_counts

STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
SEGM_NAMES = ["segm_AP", "segm_AP50", "segm_AP75", "segm_APs", "segm_APm", "segm_APl"]


def masks_to_rles(masks: torch.Tensor) -> list[dict]:
    """[D, 1, H, W] probabilities -> D COCO RLEs of the masks at 0.5, counts as str (json-ready)."""
    from pycocotools import mask as mask_utils

    if not len(masks):
        return []
    binary = np.asfortranarray((masks[:, 0] >= 0.5).permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    rles = mask_utils.encode(binary)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, progress: bool = True,
            autocast=contextlib.nullcontext) -> list[tuple[int, dict]]:
    """(image_id, detections in original image coordinates) for every image of the loader."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
            if not images:  # every image of the batch was dropped (data.bad_records.missing_image: drop)
                continue
            images = [img.to(device, non_blocking=True) for img in images]
            with autocast():
                detections = model(images, original_sizes=[t["orig_size"] for t in targets])
            for target, det in zip(targets, detections):
                kept = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in det.items()
                        if k not in ("masks", "rles")}
                if "masks" in det:
                    kept["rles"] = masks_to_rles(det["masks"])
                if "rles" in det:  # sliced inference encodes its masks itself (infer/sliced.py)
                    kept["rles"] = det["rles"]
                out.append((target["image_id"], kept))
    finally:
        model.train(was_training)
    return out


def to_coco_results(predictions: list[tuple[int | str, dict]], label_to_cat_id: dict[int, int]) -> list[dict]:
    """COCO results with the file's image ids (an int or a str; pycocotools gets its own through
    CocoDetection.results_for_coco)."""
    results = []
    for image_id, det in predictions:
        image_id = image_id if isinstance(image_id, str) else int(image_id)
        boxes = det["boxes"].tolist()
        rles = det.get("rles")
        for i, ((x0, y0, x1, y1), label, score) in enumerate(zip(boxes, det["labels"].tolist(),
                                                                det["scores"].tolist())):
            result = {"image_id": image_id, "category_id": label_to_cat_id[int(label)],
                      "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                      "score": round(float(score), 5)}
            if rles is not None:
                result["segmentation"] = rles[i]
            results.append(result)
    return results


def coco_metrics(dataset: CocoDetection, results: list[dict], segm: bool | None = None,
                 image_ids: list | None = None) -> dict:
    """AP, AP50, AP75, APs/m/l, AR@1/10/100 and per-class AP (all in [0, 1]; -1 = undefined);
    with `segm` (default: when the results carry masks) also segm_AP... and per_class_segm_AP.
    `image_ids`: the images scored (default: all the dataset's), those the model was run on."""
    segm = any("segmentation" in r for r in results[:1]) if segm is None else segm
    image_ids = [r.image_id for r in dataset.records] if image_ids is None else image_ids
    coco_gt = dataset.coco_api()
    metrics = _scored(dataset, coco_gt, results, "bbox", STAT_NAMES, "per_class_AP", image_ids)
    if segm:
        metrics.update(_scored(dataset, coco_gt, results, "segm", SEGM_NAMES, "per_class_segm_AP", image_ids))
    return metrics


def _scored(dataset: CocoDetection, coco_gt, results: list[dict], iou_type: str, names: list[str],
            per_class_key: str, image_ids: list) -> dict:
    from pycocotools.cocoeval import COCOeval

    metrics = {name: 0.0 for name in names}
    metrics[per_class_key] = {name: 0.0 for name in dataset.class_names}
    if not results:  # pycocotools cannot load an empty result list; nothing detected scores 0
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):
        # loadRes sets each result's area from its box (bbox) or mask (segm): on copies, with its ids
        coco_dt = coco_gt.loadRes(dataset.results_for_coco(results))
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.params.imgIds = [dataset.coco_image_ids[i] for i in image_ids]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics.update({name: float(v) for name, v in zip(names, evaluator.stats)})
    precision = evaluator.eval["precision"]  # [T iou, R recall, K class, A area, M maxdets]
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        name = dataset.class_names[dataset.cat_id_to_label[cat_id] - 1]
        metrics[per_class_key][name] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    return metrics


def format_metrics(metrics: dict) -> str:
    main = "  ".join(f"{k} {metrics[k]:.3f}" for k in ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"])
    per_class = "  ".join(f"{name} {ap:.3f}" for name, ap in metrics.get("per_class_AP", {}).items())
    lines = [f"  {main}", f"  per-class AP: {per_class}"]
    if "segm_AP" in metrics:
        lines.append("  " + "  ".join(f"{k} {metrics[k]:.3f}" for k in SEGM_NAMES))
        lines.append("  per-class mask AP: " + "  ".join(f"{name} {ap:.3f}"
                                                         for name, ap in metrics["per_class_segm_AP"].items()))
    return "\n".join(lines)


def evaluate(model, dataset: CocoDetection, loader, device, thresholds: list[float],
             progress: bool = True, autocast=contextlib.nullcontext) -> tuple[dict, list[dict]]:
    """Run the model on a split; returns (metrics, COCO results)."""
    predictions = predict(model, loader, device, progress=progress, autocast=autocast)
    # Under DDP each rank predicted its shard of the images: gather them, score once on rank 0.
    shards = all_gather_objects((predictions, len(loader.dataset)))
    predictions = [p for shard, _ in shards for p in shard]
    images = sum(count for _, count in shards)  # dropped ones included
    metrics, results = None, []
    if is_main_process():
        results = to_coco_results(predictions, dataset.label_to_cat_id)
        # only the images read are scored: one the loader dropped (missing_image: drop) is not an
        # image with nothing detected
        image_ids = [image_id for image_id, _ in predictions]
        metrics = coco_metrics(dataset, results, segm=any("rles" in det for _, det in predictions),
                               image_ids=image_ids)
        metrics["images_scored"] = len(image_ids)
        metrics["images_skipped"] = images - len(image_ids)
        gt_per_image = float(np.mean([len(r.labels) for r in dataset.records])) if dataset.records else 0.0
        metrics["threshold_counts"] = threshold_counts(predictions, thresholds, gt_per_image)
    return broadcast_from_main(metrics), results
