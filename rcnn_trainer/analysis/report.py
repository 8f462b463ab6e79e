"""`rcnn-eval --analyze`: what the model and the labels get wrong, written into the eval folder.

confusion_matrix.json/.png, pr_curves.png, error_analysis.json/.png, label_issues.json (and
drawings of the top issues with --visualize), and a short printed summary. The plots need
matplotlib (the `plot` extra); without it the json files are still written and the summary says so.
Image ids stay as the file has them (int or str) in what is written; only pycocotools sees its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_convert

from rcnn_trainer.analysis.confusion import ImageDetections, confusion_matrix
from rcnn_trainer.analysis.errors import COSTS, biggest_cost, error_breakdown
from rcnn_trainer.analysis.label_issues import find_label_issues
from rcnn_trainer.atomic_io import atomic_write_text
from rcnn_trainer.run_folder import safe_name

# what analyze() writes into the eval folder (rcnn-eval claims them before it runs)
OUTPUTS = ("confusion_matrix.json", "confusion_matrix.png", "pr_curves.png", "error_analysis.json",
           "error_analysis.png", "label_issues.json", "label_issues")

TRAIN_SPLIT_BIAS = ("these are the labels the model trained on: it has partly learned their errors, so it "
                    "agrees with them more than an independent model would and finds fewer of them (a swapped "
                    "class it memorized looks right to it). For an unbiased list, train on one half of the "
                    "file and analyse the other (k-fold: data.train on half A, rcnn-eval --analyze with "
                    "data.val on half B, then swap).")


def image_detections(dataset, results: list[dict]) -> list[ImageDetections]:
    by_image: dict[int | str, list[dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    crowd: dict[int | str, list[list[float]]] = {}
    for a in dataset.evaluation_json["annotations"]:
        if a.get("iscrowd"):
            crowd.setdefault(a["image_id"], []).append(a["bbox"])
    images = []
    for record in dataset.records:
        found = by_image.get(record.image_id, [])
        boxes = box_convert(torch.tensor([r["bbox"] for r in found], dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy")
        ann_ids = [dataset.raw["annotations"][row].get("id") for row in record.rows.tolist()]
        images.append(ImageDetections(
            image_id=record.image_id, file_name=Path(record.file).name,
            gt_boxes=torch.from_numpy(record.boxes.copy()), gt_labels=torch.from_numpy(record.labels.copy()),
            gt_ids=ann_ids, boxes=boxes,
            labels=torch.tensor([dataset.cat_id_to_label[r["category_id"]] for r in found], dtype=torch.int64),
            scores=torch.tensor([r["score"] for r in found], dtype=torch.float32),
            crowd_boxes=box_convert(torch.tensor(crowd.get(record.image_id, []), dtype=torch.float32).reshape(-1, 4),
                                    "xywh", "xyxy")))
    return images


def analyze(dataset, results: list[dict], out: Path, score: float = 0.3, split: str = "val",
            visualize: int = 0, say=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    names = list(dataset.class_names)
    images = image_detections(dataset, results)
    matrix = confusion_matrix(images, len(names), score=score, iou=0.5)
    gt_count, det_count = int(matrix[1:, :].sum()), int(matrix[:, 1:].sum())
    atomic_write_text(out / "confusion_matrix.json", json.dumps({
        "classes": ["background", *names], "rows": "ground truth (row 0: detections that matched no object)",
        "columns": "detected class (column 0: objects no detection matched)", "score": score, "iou": 0.5,
        "gt_count": gt_count, "detection_count": det_count, "matrix": matrix.tolist()}, indent=1))
    label_to_cat = dict(dataset.label_to_cat_id)
    breakdown = error_breakdown(dataset.coco_api(), dataset.results_for_coco(results),
                                [dataset.coco_image_ids[r.image_id] for r in dataset.records],
                                {cat: names[label - 1] for label, cat in label_to_cat.items()})
    atomic_write_text(out / "error_analysis.json", json.dumps({
        "stages": "AP at C75, C50, Loc (IoU 0.1), Sim, Oth, BG, FN (rcnn_trainer/analysis/errors.py)",
        "overall": breakdown["overall"], "costs": breakdown["costs"], "per_class": breakdown["per_class"],
        "per_class_costs": breakdown["per_class_costs"]}, indent=1))
    issues = find_label_issues(images, label_to_cat, min_score=score)
    atomic_write_text(out / "label_issues.json", json.dumps(issues, indent=1))
    plotted = _plots(out, matrix, ["background", *names], breakdown)
    if visualize:
        _draw_issues(dataset, issues[:visualize], out / "label_issues")
    kinds = {k: sum(1 for i in issues if i["kind"] == k) for k in ("overlooked", "swapped", "badly_located", "spurious")}
    say(f"[analyze] confusion matrix at score >= {score:g}, IoU >= 0.5: {gt_count} objects "
        f"({int(matrix[1:, 0].sum())} missed, {int(np.trace(matrix[1:, 1:]))} right class, "
        f"{int(matrix[1:, 1:].sum() - np.trace(matrix[1:, 1:]))} another class), {det_count} detections "
        f"({int(matrix[0, 1:].sum())} on no object)")
    say(f"[analyze] {biggest_cost(breakdown)}; AP50 {breakdown['overall']['C50']:.3f} -> "
        + ", ".join(f"{name.replace('_', ' ')} +{breakdown['costs'][name]:.3f}" for name in COSTS))
    say(f"[analyze] {len(issues)} possible label issues ({', '.join(f'{n} {k}' for k, n in kinds.items())}), "
        f"most suspicious first in {out / 'label_issues.json'}"
        + (f"; the top {min(visualize, len(issues))} drawn in {out / 'label_issues'}" if visualize else ""))
    if split == "train":
        say(f"[analyze] NOTE --split train: {TRAIN_SPLIT_BIAS}")
    if not plotted:
        say("[analyze] plots skipped: matplotlib is not installed (pip install 'rcnn_trainer[plot]'); json written")
    return {"confusion_matrix": matrix, "breakdown": breakdown, "label_issues": issues}


def _plots(out: Path, matrix: np.ndarray, classes: list[str], breakdown: dict) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from rcnn_trainer.atomic_io import atomic_write

    def save(fig, name):
        atomic_write(out / name, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)

    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n))
    ax.imshow(np.log1p(matrix), cmap="Blues")
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("detected")
    ax.set_ylabel("ground truth")
    save(fig, "confusion_matrix.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, stage in zip(axes, ("C50", "C75")):
        for name, precision in breakdown["precision"][stage].items():
            ax.plot(breakdown["recall"], np.clip(precision, 0, 1), label=name)
        ax.set_title(f"precision-recall at IoU {stage[1:]}")
        ax.set_xlabel("recall")
    axes[0].set_ylabel("precision")
    axes[1].legend(fontsize=6, ncol=2)
    save(fig, "pr_curves.png")

    rows = ["overall", *breakdown["per_class"]]
    costs = [breakdown["costs"], *breakdown["per_class_costs"].values()]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.3 * len(rows)))
    left = np.array([(breakdown["overall"] if r == "overall" else breakdown["per_class"][r])["C50"] for r in rows])
    ax.barh(rows, left, color="0.3", label="AP50")
    for name in COSTS:
        widths = np.array([c[name] for c in costs])
        ax.barh(rows, widths, left=left, label=name.replace("_", " "))
        left = left + widths
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("AP at IoU 0.5, and what each error type costs")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
    save(fig, "error_analysis.png")
    return True


def _draw_issues(dataset, issues: list[dict], folder: Path) -> None:
    from PIL import Image

    from rcnn_trainer.data.pixels import to_rgb
    from rcnn_trainer.analysis.drawing import draw_detections

    records = {r.image_id: r for r in dataset.records}
    xyxy = lambda b: box_convert(torch.tensor([b], dtype=torch.float32), "xywh", "xyxy")[0].tolist()
    for rank, issue in enumerate(issues, 1):
        record = records[issue["image_id"]]
        with Image.open(record.path) as img:
            image = to_rgb(img)
        annotated = [] if issue["kind"] == "overlooked" else [xyxy(issue["bbox"])]
        shown = issue.get("model_bbox") or (issue["bbox"] if issue["kind"] in ("overlooked", "swapped") else None)
        text = f"{rank}. {issue['kind']} {issue['score']:.2f}"
        draw_detections(image, annotated, [(xyxy(shown), text)] if shown else [],
                        folder / f"{rank:03d}_{issue['kind']}_{safe_name(issue['image_id'])}.png")
