"""rcnn-eval --analyze: confusion matrix sums, a hand-computed error breakdown, label issues."""

from __future__ import annotations

import json

import pytest
import torch
from pycocotools.coco import COCO

from rcnn_trainer.analysis.confusion import ImageDetections, confusion_matrix
from rcnn_trainer.analysis.errors import error_breakdown
from rcnn_trainer.analysis.label_issues import find_label_issues
from rcnn_trainer.cli import eval_main
from rcnn_trainer.config_loader import load_config
from rcnn_trainer.data.loader import build_dataset


def coco(annotations, supercategories=("x", "x")):
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
                  "categories": [{"id": 10, "name": "a", "supercategory": supercategories[0]},
                                 {"id": 20, "name": "b", "supercategory": supercategories[1]}],
                  "annotations": [{"id": i + 1, "iscrowd": 0, "area": a[2] * a[3], "image_id": img, "category_id": cat,
                                   "bbox": list(a)} for i, (img, cat, a) in enumerate(annotations)]}
    gt.createIndex()
    return gt


def test_error_breakdown_matches_a_hand_computed_case():
    """Image 1: an 'a' found exactly (0.8). Image 2: a 'b' taken for an 'a' (0.9), no 'b'
    detection. Class a: the 0.9 false positive ranks first, so AP 0.5 until the b object is
    forgiven (similar class when a and b share a supercategory, other class when not); class b
    is missed (AP 0 until FN)."""
    gt_annotations = [(1, 10, (10, 10, 30, 30)), (2, 20, (50, 50, 30, 30))]
    results = [{"image_id": 1, "category_id": 10, "bbox": [10, 10, 30, 30], "score": 0.8},
               {"image_id": 2, "category_id": 10, "bbox": [50, 50, 30, 30], "score": 0.9}]
    same = error_breakdown(coco(gt_annotations), results, [1, 2], {10: "a", 20: "b"})
    a, b = same["per_class"]["a"], same["per_class"]["b"]
    assert a["C75"] == pytest.approx(0.5) and a["C50"] == pytest.approx(0.5) and a["Loc"] == pytest.approx(0.5)
    assert a["Sim"] == pytest.approx(1.0) and a["Oth"] == pytest.approx(1.0)
    assert b["Oth"] == 0.0 and b["BG"] == 0.0 and b["FN"] == 1.0
    assert same["per_class_costs"]["a"]["similar_class"] == pytest.approx(0.5)
    assert same["per_class_costs"]["b"]["missed"] == pytest.approx(1.0)
    assert same["costs"]["similar_class"] == pytest.approx(0.25) and same["costs"]["missed"] == pytest.approx(0.5)
    apart = error_breakdown(coco(gt_annotations, ("x", "y")), results, [1, 2], {10: "a", 20: "b"})
    assert apart["per_class_costs"]["a"]["similar_class"] == 0.0
    assert apart["per_class_costs"]["a"]["other_class"] == pytest.approx(0.5)
    # a box of the right class at IoU 0.33 is a localization error
    shifted = [{"image_id": 1, "category_id": 10, "bbox": [25, 10, 30, 30], "score": 0.8}]
    loc = error_breakdown(coco(gt_annotations[:1]), shifted, [1, 2], {10: "a", 20: "b"})
    assert loc["per_class"]["a"]["C50"] == 0.0 and loc["per_class_costs"]["a"]["localization"] == pytest.approx(1.0)


def image(gt, dets):
    return ImageDetections(1, "im.png", torch.tensor([g[1] for g in gt], dtype=torch.float32).reshape(-1, 4),
                           torch.tensor([g[0] for g in gt]), list(range(101, 101 + len(gt))),
                           torch.tensor([d[1] for d in dets], dtype=torch.float32).reshape(-1, 4),
                           torch.tensor([d[0] for d in dets]), torch.tensor([d[2] for d in dets]))


def test_confusion_matrix_rows_and_columns():
    im = image([(1, [0, 0, 10, 10]), (2, [20, 20, 30, 30]), (1, [50, 50, 60, 60])],
               [(1, [0, 0, 10, 10], 0.9), (1, [20, 20, 30, 30], 0.8), (2, [80, 80, 90, 90], 0.7),
                (2, [0, 0, 10, 10], 0.2)])
    m = confusion_matrix([im], 2, score=0.3)
    assert m.tolist() == [[0, 0, 1], [1, 1, 0], [0, 1, 0]]  # bg row: 1 FP of class 2; class-1 GT: 1 missed, 1 right
    assert m[1:, :].sum() == 3 and m[:, 1:].sum() == 3


def test_detections_in_a_crowd_region_are_neither_false_positives_nor_overlooked():
    im = image([(1, [0, 0, 10, 10])], [(1, [0, 0, 10, 10], 0.9), (2, [52, 52, 60, 60], 0.8), (2, [80, 80, 95, 95], 0.7)])
    im.crowd_boxes = torch.tensor([[50.0, 50.0, 90.0, 90.0]])  # holds the second detection, half of the third
    assert im.in_crowd(0.5).tolist() == [False, True, False]
    m = confusion_matrix([im], 2, score=0.3)
    assert m.tolist() == [[0, 0, 1], [0, 1, 0], [0, 0, 0]]  # only the third (mostly outside) is on no object
    overlooked = [i["bbox"] for i in find_label_issues([im], {1: 7, 2: 3}) if i["kind"] == "overlooked"]
    assert overlooked == [[80, 80, 15, 15]]


def test_label_issue_kinds():
    im = image([(1, [0, 0, 20, 20]), (2, [40, 40, 60, 60]), (1, [70, 10, 90, 30]), (2, [5, 70, 25, 90])],
               [(1, [0, 0, 20, 20], 0.95),          # agrees with the first annotation
                (1, [40, 40, 60, 60], 0.9),         # sees class 1 where 2 is annotated: swapped
                (1, [80, 10, 100, 30], 0.85),       # the third annotation is 10 px off: badly located
                (2, [40, 5, 55, 20], 0.8)])         # an object with no annotation: overlooked
    issues = find_label_issues([im], {1: 7, 2: 3}, min_score=0.3)
    kinds = {i["kind"]: i for i in issues}
    assert set(kinds) == {"swapped", "badly_located", "overlooked", "spurious"}
    assert kinds["swapped"]["annotation_id"] == 102 and kinds["swapped"]["category_id"] == 7
    assert kinds["badly_located"]["annotation_id"] == 103 and kinds["badly_located"]["model_bbox"] == [80, 10, 20, 20]
    assert kinds["overlooked"]["annotation_id"] is None and kinds["overlooked"]["bbox"] == [40, 5, 15, 15]
    assert kinds["spurious"]["annotation_id"] == 104  # nothing the model sees there
    assert [i["score"] for i in issues] == sorted((i["score"] for i in issues), reverse=True)


def test_eval_analyze_writes_every_file_and_the_matrix_sums(trained, tmp_path, capsys):
    config, checkpoint = trained
    out = tmp_path / "eval"
    assert eval_main(["--config", str(config), "--checkpoint", str(checkpoint), "--analyze", "--analyze-score", "0.05",
                      "--no-progress", "--output-dir", str(out), "--visualize", "2"]) == 0
    printed = capsys.readouterr().out
    assert "[analyze]" in printed and "the biggest loss of AP is" in printed
    for name in ("confusion_matrix.json", "confusion_matrix.png", "pr_curves.png", "error_analysis.json",
                 "error_analysis.png", "label_issues.json"):
        assert (out / name).is_file(), name
    cm = json.loads((out / "confusion_matrix.json").read_text())
    results = json.loads((out / "coco_results.json").read_text())
    val_set = build_dataset(load_config(str(config)), "val")
    assert cm["gt_count"] == sum(len(r.labels) for r in val_set.records) == sum(map(sum, cm["matrix"][1:]))
    assert cm["detection_count"] == sum(1 for r in results if r["score"] >= 0.05) == sum(
        sum(row[1:]) for row in cm["matrix"])
    issues = json.loads((out / "label_issues.json").read_text())
    assert all({"image_id", "file_name", "kind", "annotation_id", "bbox", "category_id", "score"} <= i.keys()
               for i in issues)
    assert eval_main(["--config", str(config), "--checkpoint", str(checkpoint), "--analyze", "--split", "train",
                      "--no-progress", "--output-dir", str(tmp_path / "train_eval")]) == 0
    assert "NOTE --split train" in capsys.readouterr().out
