"""Which errors cost the AP: the breakdown of Hoiem et al. as COCO's analyze() and
MMDetection's coco_error_analysis compute it, with pycocotools.

Per class, precision-recall at stages that each forgive one more kind of error:
  C75  at IoU 0.75          C50  at IoU 0.5          Loc  at IoU 0.1 (localization forgiven)
  Sim  Loc, with detections on objects of another class of the same supercategory ignored
  Oth  Loc, with detections on objects of any other class ignored
  BG   Oth with every remaining false positive removed (precision 1 wherever recall is reached)
  FN   1.0 (the missed objects found too)
The AP of each stage is the mean precision over COCO's 101 recall points (area all, 100
detections); what an error type costs is the AP gained by forgiving it:
  localization = Loc - C50, similar_class = Sim - Loc, other_class = Oth - Sim,
  background = BG - Oth, missed = FN - BG.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np

STAGES = ["C75", "C50", "Loc", "Sim", "Oth", "BG", "FN"]
COSTS = {"localization": ("C50", "Loc"), "similar_class": ("Loc", "Sim"), "other_class": ("Sim", "Oth"),
         "background": ("Oth", "BG"), "missed": ("BG", "FN")}
COST_WORDS = {"localization": "boxes of the right class placed badly (IoU 0.1-0.5)",
              "similar_class": "objects taken for a class of the same supercategory",
              "other_class": "objects taken for another class",
              "background": "detections where there is no object",
              "missed": "objects no detection found"}


def _evaluate(coco_gt, results: list[dict], img_ids: list[int], cat_ids: list[int], iou_thrs: list[float]):
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds, evaluator.params.catIds = img_ids, cat_ids
        evaluator.params.iouThrs = np.array(iou_thrs)
        evaluator.params.maxDets = [100]
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator.eval["precision"][:, :, :, 0, 0]  # [T, R, K] at area all, 100 detections


def _ignoring_other_classes(coco_gt, cat_id: int, other_ids: set[int], image_ids: set[int]):
    """The ground truth of `cat_id`, with the objects of `other_ids` in `image_ids` (the images
    holding its detections: elsewhere they change nothing) turned into crowd regions of
    `cat_id`: a detection of cat_id on them is neither a true nor a false positive. Only what
    the evaluation of cat_id reads is copied (80 classes of a large file would otherwise copy
    and index every annotation 160 times)."""
    from pycocotools.coco import COCO

    data = copy.copy(coco_gt.dataset)
    own = coco_gt.loadAnns(coco_gt.getAnnIds(catIds=[cat_id]))
    nearby = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=sorted(image_ids))) if image_ids else []
    data["annotations"] = own + [dict(a, iscrowd=1, ignore=1, category_id=cat_id) for a in nearby
                                 if a["category_id"] in other_ids]
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _ap(precision: np.ndarray) -> float:
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else -1.0


def error_breakdown(coco_gt, results: list[dict], img_ids: list[int], class_names: dict[int, str]) -> dict:
    """{"per_class": {name: {stage: AP}}, "overall": {stage: AP}, "costs": {...}, "per_class_costs": {...},
    "precision": {"C50"/"C75": [R, K] arrays for the PR curves}, "recall": the 101 recall points}.
    `class_names`: category id -> name. `results` and `img_ids` carry the image ids `coco_gt` knows
    (for a dataset: CocoDetection.results_for_coco and coco_image_ids)."""
    cat_ids = sorted(class_names)
    supercategory = {c["id"]: c.get("supercategory") for c in coco_gt.dataset.get("categories", [])}
    with_gt = {a["category_id"] for a in coco_gt.dataset["annotations"] if not a.get("iscrowd")}
    per_class: dict[str, dict[str, float]] = {}
    stages_by_class = {}
    if results:
        main = _evaluate(coco_gt, results, img_ids, cat_ids, [0.75, 0.5, 0.1])
    else:
        main = np.where(np.isin(np.array(cat_ids), list(with_gt))[None, None, :], 0.0, -1.0) * np.ones((3, 101, 1))
    for k, cat in enumerate(cat_ids):
        if cat not in with_gt:
            continue  # no object of the class in this split: its AP is undefined
        mine = [r for r in results if r["category_id"] == cat]
        stages = {"C75": main[0, :, k], "C50": main[1, :, k], "Loc": main[2, :, k]}
        for stage, others in (("Sim", {c for c in cat_ids if c != cat and supercategory.get(c) is not None
                                       and supercategory.get(c) == supercategory.get(cat)}),
                              ("Oth", {c for c in cat_ids if c != cat})):
            if not mine:
                stages[stage] = np.zeros(101)
            elif not others:
                stages[stage] = stages["Loc"]
            else:
                gt = _ignoring_other_classes(coco_gt, cat, others, {r["image_id"] for r in mine})
                stages[stage] = _evaluate(gt, mine, img_ids, [cat], [0.1])[0, :, 0]
        stages["BG"] = (stages["Oth"] > 0).astype(float)
        stages["FN"] = np.ones(101)
        stages_by_class[cat] = stages
        per_class[class_names[cat]] = {s: _ap(v) for s, v in stages.items()}
    overall = {s: float(np.mean([c[s] for c in per_class.values()])) if per_class else -1.0 for s in STAGES}

    def costs(aps: dict) -> dict:
        return {name: max(0.0, aps[b] - aps[a]) for name, (a, b) in COSTS.items()}

    return {"overall": overall, "per_class": per_class, "costs": costs(overall),
            "per_class_costs": {name: costs(aps) for name, aps in per_class.items()},
            "precision": {s: {class_names[c]: st[s] for c, st in stages_by_class.items()} for s in ("C50", "C75")},
            "recall": np.linspace(0.0, 1.0, 101)}


def biggest_cost(breakdown: dict) -> str:
    name, value = max(breakdown["costs"].items(), key=lambda kv: kv[1])
    worst = max(breakdown["per_class_costs"].items(), key=lambda kv: kv[1][name], default=None)
    where = f"; most in class '{worst[0]}' ({worst[1][name]:.3f})" if worst else ""
    return (f"the biggest loss of AP is {name.replace('_', ' ')}: {COST_WORDS[name]} cost {value:.3f} AP "
            f"(at IoU 0.5, over classes){where}")
