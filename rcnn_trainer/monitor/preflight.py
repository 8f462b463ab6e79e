"""Dataset preflight: catch the data bugs that make training silently useless, before it starts.

Runs at the start of training and alone with `rcnn-train --preflight`. Findings are Alarms
with a severity: an "error" stops the run (exit code 2), a "warning" is printed.
Checks: objects per image and empty images (0 objects loaded), images dropped, classes lost
while loading, class imbalance, normalized boxes, xyxy written where COCO wants xywh, boxes
outside the image, boxes smaller than the anchor stride, anchor coverage by size bucket, and
the same box checks on a sample of images after augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rcnn_trainer.data.coco import CocoDetection
from rcnn_trainer.data.anchor_fit import best_anchor_ious, box_sides, fpn_strides, octave_sizes, resized_boxes, sample_records
from rcnn_trainer.data.head_size import MANY_CLASSES, WIDE_HEAD
from rcnn_trainer.data.tiled_dataset import tiled_view
from rcnn_trainer.config_monitor import PreflightLimits
from rcnn_trainer.monitor.alarms import Alarm
from rcnn_trainer.monitor.tiling_hint import tiling_hint

SIZE_BUCKETS = [("small", 0, 32), ("medium", 32, 96), ("large", 96, float("inf"))]


@dataclass
class Finding:
    severity: str  # "error" | "warning"
    alarm: Alarm


@dataclass
class PreflightReport:
    numbers: dict = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def add(self, severity: str, alarm: Alarm) -> None:
        self.findings.append(Finding(severity, alarm))

    @property
    def errors(self) -> list[Alarm]:
        return [f.alarm for f in self.findings if f.severity == "error"]

    def format(self) -> str:
        n = self.numbers
        lines = [f"[preflight] {n['split']}: {n['objects_per_image']:.2f} objects/image, "
                 f"{100 * n['empty_share']:.0f}% images without objects, {n['images_kept']}/{n['images_in_file']} "
                 f"images kept; class imbalance {n['imbalance']:.1f}:1"]
        if "anchor_coverage" in n:
            cov = "  ".join(f"{b}: {c['boxes']} boxes, {100 * c['below_fg']:.0f}% < fg_iou, {100 * c['below_0.5']:.0f}% < 0.5"
                            for b, c in n["anchor_coverage"].items() if c["boxes"])
            lines.append(f"[preflight]   anchor coverage (best anchor IoU per GT box): {cov}")
        for f in self.findings:
            lines.append(("ERROR " if f.severity == "error" else "WARNING ") + f.alarm.format())
        return "\n".join(lines)


def run_preflight(dataset: CocoDetection, split: str, *, anchor_sizes: list[list[float]], aspect_ratios: list[float],
                  strides: list[int], min_size: int, max_size: int, fg_iou_thresh: float,
                  head: dict[str, int] | None = None, seed: int = 0,
                  limits: PreflightLimits = PreflightLimits()) -> PreflightReport:
    """`head`: the model's representation_size and fpn_channels, to judge them against the
    number of classes (None skips that check)."""
    report = PreflightReport()
    records = dataset.records
    per_image = np.array([len(r.labels) for r in records])
    as_written = dataset.file_boxes
    # one bincount over all labels: per class and record it was 9.8M numpy calls (18 s) at COCO size
    labels = np.concatenate([r.labels for r in records]) if records else np.zeros(0, dtype=np.int64)
    per_class = np.bincount(labels.astype(np.int64), minlength=len(dataset.class_names) + 1)
    counts_loaded = {name: int(per_class[i + 1]) for i, name in enumerate(dataset.class_names)}
    in_file = np.bincount(as_written.labels, minlength=len(dataset.class_names) + 1)
    counts_raw = {name: int(in_file[i + 1]) for i, name in enumerate(dataset.class_names)}
    present = [c for c in counts_loaded.values() if c > 0]
    report.numbers = {
        "split": split, "images_in_file": len(dataset.raw["images"]), "images_kept": len(records),
        "objects_per_image": float(per_image.mean()) if len(per_image) else 0.0,
        "empty_share": float((per_image == 0).mean()) if len(per_image) else 1.0,
        "class_counts": counts_loaded, "class_counts_in_file": counts_raw,
        "imbalance": max(present) / min(present) if present else 0.0,
    }
    _check_counts(report, dataset, per_image, counts_raw, counts_loaded, limits)
    if head is not None:
        _check_head_capacity(report, len(dataset.class_names), head)
    _check_box_format(report, dataset, as_written, limits)
    if per_image.sum() > 0:
        _check_sizes_and_anchors(report, dataset, anchor_sizes, aspect_ratios, strides, min_size, max_size,
                                 fg_iou_thresh, seed, limits)
        _check_augmented(report, dataset, limits.augmented_samples)
    return report


def _check_counts(report, dataset, per_image, counts_raw, counts_loaded, limits: PreflightLimits) -> None:
    n = report.numbers
    if len(per_image) == 0 or per_image.sum() == 0:
        report.add("error", Alarm(
            "no_objects", f"{n['images_kept']} images loaded from '{dataset.ann_file}', 0 objects "
            f"({len(dataset.raw['annotations'])} annotations in the file; dropped: {dict(dataset.report.counts) or 'none'})",
            "a detector trained on images without objects learns to predict nothing",
            ["data.train.ann_file: check it is the right file, that category ids match 'categories' and boxes are "
             "[x, y, w, h] in pixels", "data.bad_records: see which policy dropped them"]))
        return
    if n["images_kept"] < limits.min_kept_share * n["images_in_file"]:
        report.add("error", Alarm(
            "images_dropped", f"only {n['images_kept']} of {n['images_in_file']} images survived loading "
            f"({dict(dataset.report.counts)})", "most of the data is missing: the image folder is probably wrong",
            ["data.train.img_dir / data.val.img_dir: the folder `file_name` is relative to"]))
    lost = [c for c in counts_raw if counts_raw[c] > 0 and counts_loaded[c] == 0]
    if lost:
        report.add("error", Alarm(
            "class_lost", f"classes {lost} have {[counts_raw[c] for c in lost]} annotations in the file but none "
            f"after loading (dropped: {dict(dataset.report.counts)})",
            "the model will never see these classes and score 0 AP on them",
            ["data.bad_records: the policy that dropped their boxes (see the summary above)"]))
    present = {c: v for c, v in counts_loaded.items() if v > 0}
    if present and n["imbalance"] > limits.imbalance:
        top = max(present.values())
        rare = [c for c, v in present.items() if v * limits.imbalance < top]
        report.add("warning", Alarm(
            "class_imbalance", f"class imbalance {n['imbalance']:.0f}:1; rare classes: "
            + ", ".join(f"{c} ({present[c]})" for c in rare),
            "rare classes get few positive RoIs and are swamped by frequent ones and background",
            ["data.repeat_factor_threshold: 0.1-0.3 (images of rare classes are drawn more often)",
             "model.roi.cls_loss.type: focal", "model.roi.cls_pos_weight: raise it (2-5)"]))


def _check_head_capacity(report, num_classes: int, head: dict[str, int]) -> None:
    narrow = {k: v for k, v in head.items() if v < WIDE_HEAD[k]}
    if num_classes >= MANY_CLASSES and narrow:
        report.add("warning", Alarm(
            "narrow_head", f"{num_classes} classes with " + ", ".join(f"{k} {v}" for k, v in narrow.items()),
            "on 10-class real data this head found the objects but confused their classes (AP 0.066 vs 0.102 with "
            "the wider head of configs/many_classes.yaml, same 300 iterations; ~2x the time per iteration)",
            ["model.backbone.fpn_channels, model.roi.representation_size, model.roi.batch_size_per_image: auto "
             "(the wide head from 10 classes, as config.yaml does)",
             "_base_: configs/many_classes.yaml (or model.roi.representation_size=1024 "
             "model.backbone.fpn_channels=128 model.roi.batch_size_per_image=128)"]))


def _check_box_format(report, dataset, as_written, limits: PreflightLimits) -> None:
    raw_boxes = as_written.xywh
    if not len(raw_boxes):
        return
    sizes = np.array([(im["width"], im["height"]) for im in dataset.raw["images"]], dtype=np.float64)
    if raw_boxes.min() >= 0 and raw_boxes.max() <= 1.0 and sizes.min() > limits.normalized_min_side:
        report.add("error", Alarm(
            "normalized_boxes", f"all {len(raw_boxes)} box coordinates lie in [0, 1] on images of at least "
            f"{int(sizes.min())} px", "COCO boxes are in pixels; normalized boxes become sub-pixel objects",
            ["the annotation file: multiply x and w by the image width, y and h by its height"]))
        return
    wh = as_written.image_wh
    x, y, w, h = raw_boxes.T
    outside_as_xywh = (x + w > wh[:, 0] + 1) | (y + h > wh[:, 1] + 1)
    fits_as_xyxy = (w > x) & (h > y) & (w <= wh[:, 0] + 1) & (h <= wh[:, 1] + 1)
    share = float((outside_as_xywh & fits_as_xyxy).mean())
    report.numbers["xyxy_suspect_share"] = share
    if share > limits.xyxy_share:
        report.add("error", Alarm(
            "xyxy_boxes", f"{100 * share:.0f}% of boxes extend past the image when read as COCO [x, y, w, h] "
            "but fit it when read as [x1, y1, x2, y2]",
            "the file holds corner coordinates where COCO wants width and height: every box would be too large",
            ["the annotation file: write bbox as [x1, y1, x2 - x1, y2 - y1]"]))
    outside = sum(v for k, v in dataset.report.counts.items() if k.startswith("box_outside_image"))
    if outside > limits.outside_share * len(raw_boxes) and share <= limits.xyxy_share:
        report.add("warning", Alarm(
            "boxes_outside_image", f"{outside} of {len(raw_boxes)} boxes extend past the image border",
            "clipped or dropped boxes change what the model learns",
            ["data.bad_records.box_outside_image: error to find them, clip or drop"]))


def _check_sizes_and_anchors(report, dataset, anchor_sizes, aspect_ratios, strides, min_size, max_size,
                             fg_iou_thresh, seed, limits: PreflightLimits) -> None:
    shaped = resized_boxes(sample_records(dataset.records, limits.max_images, seed), min_size, max_size)
    best_iou = best_anchor_ious(shaped, anchor_sizes, aspect_ratios, strides)
    side = box_sides(shaped)
    short_side = torch.cat([torch.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) for _, b in shaped])
    coverage = {}
    for bucket, lo, hi in SIZE_BUCKETS:
        mask = (side >= lo) & (side < hi)
        count = int(mask.sum())
        coverage[bucket] = {"boxes": count,
                            "below_fg": float((best_iou[mask] < fg_iou_thresh).float().mean()) if count else 0.0,
                            "below_0.5": float((best_iou[mask] < 0.5).float().mean()) if count else 0.0}
    report.numbers["anchor_coverage"] = coverage
    poor = {b: c for b, c in coverage.items()
            if c["boxes"] >= limits.anchor_min_boxes and c["below_0.5"] > limits.anchor_poor_share}
    if poor:
        # FPN levels double their stride: keep the octave spacing, start at the small boxes
        suggested = octave_sizes(max(4, int(round(float(np.quantile(side.numpy(), 0.1))))), len(anchor_sizes))
        report.add("warning", Alarm(
            "anchor_coverage", "share of GT boxes whose best anchor IoU is below 0.5: "
            + ", ".join(f"{b} {100 * c['below_0.5']:.0f}% of {c['boxes']}" for b, c in poor.items())
            + f" (anchors {anchor_sizes}, boxes after resize: median side {float(side.median()):.0f} px)",
            "objects that no anchor overlaps well get few or no positive anchors: the RPN never proposes them",
            [f"model.anchors.sizes: auto (fits them to the boxes), or {suggested} (one octave per level from the "
             "10th percentile of box sizes)",
             "data.min_size / data.max_size: resize larger (see configs/small_objects.yaml)",
             "model.rpn.fg_iou_thresh: lower it (e.g. 0.5) for odd shapes"]))
    tiny = float((short_side < strides[0]).float().mean())
    report.numbers["smaller_than_stride_share"] = tiny
    if tiny > limits.tiny_share:
        # the resize that brings 95% of the boxes to at least one stride of the finest level
        factor = strides[0] / max(float(np.quantile(short_side.numpy(), 0.05)), 1e-3)
        new_min, new_max = (int(np.ceil(v * factor / 32) * 32) for v in (min_size, max_size))
        report.numbers["suggested_min_size"] = new_min
        report.add("warning", Alarm(
            "tiny_boxes", f"{100 * tiny:.0f}% of boxes are thinner than the smallest anchor stride ({strides[0]} px) "
            f"after resize to data.min_size={min_size}", "features that coarse barely see them; RoIAlign samples "
            "less than a cell, so these objects are found late or never",
            [f"data.min_size: {new_min} and data.max_size: {new_max} (95% of boxes then span a stride; "
             f"costs ~{factor ** 2:.1f}x the time per iteration)", "model.anchors.sizes: auto, or a smaller first level"]))


def _check_augmented(report, dataset, samples) -> None:
    """The boxes after the training transforms still lie inside the image and are not degenerate."""
    bad, checked, lost = 0, 0, 0
    for index in range(min(samples, len(dataset))):
        image, target = dataset[(index, 0)]
        boxes = target["boxes"]
        h, w = image.shape[-2:]
        checked += len(boxes)
        lost += len(dataset.records[index].labels) - len(boxes)
        if len(boxes):
            outside = (boxes[:, 0] < -1) | (boxes[:, 1] < -1) | (boxes[:, 2] > w + 1) | (boxes[:, 3] > h + 1)
            degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
            bad += int((outside | degenerate).sum())
    report.numbers["augmented_boxes_checked"] = checked
    if bad or lost:
        report.add("error", Alarm(
            "augmentation_boxes", f"after the training transforms, {bad} of {checked} boxes on {samples} sampled images "
            f"are outside the image or degenerate, and {lost} boxes went missing",
            "the transforms move images and boxes differently: the model learns from wrong targets",
            ["data.hflip_prob: 0 and data.augment (each step off) to isolate the transform",
             "data.min_size / data.max_size"]))


def preflight_from_config(cfg, dataset: CocoDetection, split: str) -> PreflightReport:
    """run_preflight with the model's anchors and the data's resize (the only config reader here).
    With data.tiling on, the boxes are judged as the tiles show them (tile_records); off, images far
    larger than max_size whose objects shrink below the finest stride get a data.tiling suggestion."""
    hint = None
    if cfg.data.tiling is None:
        hint = tiling_hint(dataset.records, cfg.data.test_min_size, cfg.data.max_size,
                           fpn_strides(cfg.model.backbone.name)[0])
    else:
        tiling = cfg.data.tiling
        dataset = tiled_view(dataset, tiling.size, tiling.overlap, tiling.min_visible)
    report = run_preflight(dataset, split, anchor_sizes=cfg.model.anchors.sizes,
                           aspect_ratios=cfg.model.anchors.aspect_ratios, strides=fpn_strides(cfg.model.backbone.name),
                           min_size=cfg.data.test_min_size, max_size=cfg.data.max_size,
                           fg_iou_thresh=cfg.model.rpn.fg_iou_thresh, seed=cfg.seed, limits=cfg.monitor.preflight,
                           head=None if cfg.model.init_from else  # the checkpoint's: checkpoint_settings.py weighs it
                           {"representation_size": cfg.model.roi.representation_size,
                            "fpn_channels": cfg.model.backbone.fpn_channels})
    if hint is not None:
        report.add("warning", hint)
    return report


def raise_on_errors(report: PreflightReport) -> None:
    from rcnn_trainer.errors import UserError

    if report.errors:
        details = "\n".join(a.format() for a in report.errors)
        raise UserError(f"dataset preflight found {len(report.errors)} problem(s) in the "
                        f"{report.numbers['split']} split that make training useless:\n{details}")
