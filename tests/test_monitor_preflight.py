"""Preflight scenarios: each data bug is caught with its numbers and the thing to change."""

from __future__ import annotations

import numpy as np
import yaml

from conftest import ann, image, tiny_config, tiny_dict, write_coco, write_yaml
from rcnn_trainer.cli import train_main
from rcnn_trainer.data.coco import CocoDetection
from rcnn_trainer.data.loader import build_dataset
from rcnn_trainer.monitor.preflight import preflight_from_config, run_preflight

ANCHORS = dict(anchor_sizes=[[8], [16], [32], [64], [96]], aspect_ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64],
               min_size=64, max_size=64, fg_iou_thresh=0.7)


def coco_scene(folder, boxes_per_image, size=64, n=6, cat=7):
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(1, n + 1):
        images.append(image(i, size, size))
        for _ in range(boxes_per_image):
            x, y = rng.uniform(0, size - 24, 2)
            w, h = rng.uniform(8, 20, 2)
            anns.append(ann(len(anns) + 1, i, cat, [round(float(x), 1), round(float(y), 1), round(float(w), 1), round(float(h), 1)]))
    return images, anns


def findings(report):
    return {f.alarm.name: f for f in report.findings}


def test_healthy_synthetic_has_no_findings(tmp_path):
    cfg = tiny_config(tmp_path)
    report = preflight_from_config(cfg, build_dataset(cfg, "train"), "train")
    assert not report.errors, report.format()
    assert report.numbers["objects_per_image"] > 1 and report.numbers["augmented_boxes_checked"] > 0


def test_normalized_boxes(tmp_path):
    images, anns = coco_scene(tmp_path, 3)
    for a in anns:
        a["bbox"] = [v / 64 for v in a["bbox"]]
    ds = CocoDetection(write_coco(tmp_path, images, anns), tmp_path)
    f = findings(run_preflight(ds, "train", **ANCHORS))["normalized_boxes"]
    assert f.severity == "error" and "all 18 box coordinates lie in [0, 1]" in f.alarm.seen


def test_xyxy_written_as_xywh(tmp_path):
    images, anns = coco_scene(tmp_path, 3)
    for a in anns:
        x, y, w, h = a["bbox"]
        a["bbox"] = [x, y, x + w, y + h]  # corners where COCO wants width/height
    ds = CocoDetection(write_coco(tmp_path, images, anns), tmp_path)
    report = run_preflight(ds, "train", **ANCHORS)
    f = findings(report)["xyxy_boxes"]
    assert f.severity == "error" and "when read as [x1, y1, x2, y2]" in f.alarm.seen
    assert report.numbers["xyxy_suspect_share"] > 0.3


def test_all_empty_annotations_fail_through_cli(tmp_path, capsys):
    images, anns = coco_scene(tmp_path, 3)
    path = write_coco(tmp_path, images, [dict(a, category_id=99) for a in anns])
    raw = tiny_dict(tmp_path)
    raw["data"] = {"train": {"ann_file": str(path), "img_dir": str(tmp_path)},
                   "val": {"ann_file": str(path), "img_dir": str(tmp_path)}, "num_workers": 0,
                   "min_size": 64, "max_size": 64, "bad_records": {"unknown_category": "drop"}}
    raw["model"]["num_classes"] = 2
    code = train_main(["--config", str(write_yaml(tmp_path / "c.yaml", raw)), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "[no_objects]" in err and "6 images loaded" in err and "0 objects" in err
    assert "unknown_category" in err and not (tmp_path / "run" / "checkpoints").exists()


def test_class_lost_while_loading(tmp_path):
    images, anns = coco_scene(tmp_path, 2)
    anns[0]["category_id"] = 3
    anns[0]["bbox"] = [10, 10, 0, 5]  # the only box of class 3 is degenerate and dropped
    ds = CocoDetection(write_coco(tmp_path, images, anns), tmp_path)
    f = findings(run_preflight(ds, "train", **ANCHORS))["class_lost"]
    assert f.severity == "error" and "['b']" in f.alarm.seen


def test_anchors_far_larger_than_objects(tmp_path):
    images, anns = coco_scene(tmp_path, 3)
    ds = CocoDetection(write_coco(tmp_path, images, anns), tmp_path)
    huge = dict(ANCHORS, anchor_sizes=[[128], [256], [512], [768], [1024]])
    report = run_preflight(ds, "train", **huge)
    f = findings(report)["anchor_coverage"]
    assert f.severity == "warning" and "small 100% of 18" in f.alarm.seen
    assert f.alarm.change[0].startswith("model.anchors.sizes: auto (fits them to the boxes), or [[")
    assert "anchor_coverage" not in findings(run_preflight(ds, "train", **ANCHORS))


def test_class_imbalance_warning(tmp_path):
    images, anns = coco_scene(tmp_path, 10, n=6)
    anns[0]["category_id"] = 3  # 1 box of 'b' against 59 of 'a'
    ds = CocoDetection(write_coco(tmp_path, images, anns), tmp_path)
    f = findings(run_preflight(ds, "train", **ANCHORS))["class_imbalance"]
    assert "b (1)" in f.alarm.seen and "model.roi.cls_loss.type: focal" in f.alarm.change
    assert f.alarm.change[0].startswith("data.repeat_factor_threshold")


def test_narrow_head_warning_from_ten_classes(tmp_path):
    images, anns = coco_scene(tmp_path, 10, n=6)
    categories = [{"id": 100 + i, "name": f"c{i}"} for i in range(12)]
    for i, ann in enumerate(anns):
        ann["category_id"] = 100 + i % 12
    ds = CocoDetection(write_coco(tmp_path, images, anns, categories=categories), tmp_path)
    narrow = run_preflight(ds, "train", head={"representation_size": 256, "fpn_channels": 64}, **ANCHORS)
    f = findings(narrow)["narrow_head"]
    assert "12 classes" in f.alarm.seen and any("configs/many_classes.yaml" in c for c in f.alarm.change)
    wide = run_preflight(ds, "train", head={"representation_size": 1024, "fpn_channels": 128}, **ANCHORS)
    assert "narrow_head" not in findings(wide)
    few_images, few_anns = coco_scene(tmp_path / "few", 10, n=6)
    few = CocoDetection(write_coco(tmp_path / "few", few_images, few_anns), tmp_path / "few")
    assert "narrow_head" not in findings(run_preflight(few, "train", head={"representation_size": 256,
                                                                            "fpn_channels": 64}, **ANCHORS))


def test_preflight_at_80_classes_resolves_auto_like_training(tmp_path, capsys):
    # config.yaml's `auto` head and anchors on an 80-class file: once a traceback comparing 'auto' with 128
    images, anns = coco_scene(tmp_path, 4, n=6)
    categories = [{"id": 1 + i, "name": f"class{i}"} for i in range(80)]
    for i, a in enumerate(anns):
        a["category_id"] = 1 + (7 * i) % 80
    path = write_coco(tmp_path, images, anns, categories=categories)
    raw = yaml.safe_load(open("config.yaml"))
    raw.pop("_base_", None)
    raw["output_dir"] = str(tmp_path / "run")
    raw["data"] = {"train": {"ann_file": str(path), "img_dir": str(tmp_path)},
                   "val": {"ann_file": str(path), "img_dir": str(tmp_path)}, "num_workers": 0,
                   "min_size": 64, "max_size": 64}
    assert raw["model"].get("num_classes", "auto") == "auto" and raw["model"]["roi"]["representation_size"] == "auto"
    code = train_main(["--config", str(write_yaml(tmp_path / "c.yaml", raw)), "--preflight"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[auto] model.num_classes: 80" in out and "model.roi.representation_size: 1024" in out
    assert "the wide head for 80 classes" in out and "[preflight] no errors." in out
    assert "narrow_head" not in out  # the resolved wide head is what the check saw
