"""Config: every error kind gives exit code 2 and a message naming file and key."""

from __future__ import annotations

import pytest
import yaml

from conftest import tiny_config, tiny_dict, write_yaml
from rcnn_trainer.cli import train_main
from rcnn_trainer.config_loader import load_config, save_config
from rcnn_trainer.errors import UserError


def run_train(capsys, *argv):
    code = train_main(list(argv))
    return code, capsys.readouterr().err


def test_defaults_match_faster_rcnn(tmp_path):
    raw = tiny_dict(tmp_path)
    raw["model"] = {"num_classes": 4}  # everything else at its default
    cfg = load_config(write_yaml(tmp_path / "c.yaml", raw))
    rpn, roi = cfg.model.rpn, cfg.model.roi
    assert (rpn.fg_iou_thresh, rpn.bg_iou_thresh, rpn.batch_size_per_image, rpn.positive_fraction) == (0.7, 0.3, 256, 0.5)
    assert (roi.batch_size_per_image, roi.positive_fraction, rpn.nms_thresh, roi.nms_thresh) == (512, 0.25, 0.7, 0.5)
    assert roi.detections_per_img == 100 and rpn.cls_pos_weight == 1.0 and roi.cls_pos_weight == 1.0
    assert cfg.monitor.score_thresholds == [0.05, 0.3, 0.5, 0.7]


def test_yaml_syntax_error_names_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\nmodel:\n  num_classes: [4\n")
    code, err = run_train(capsys, "--config", str(path))
    assert code == 2 and "bad.yaml:" in err and "YAML syntax error" in err and "Traceback" not in err


def test_unknown_key_suggests_closest(tmp_path, capsys):
    raw = tiny_dict(tmp_path)
    raw["model"]["rpn"]["cls_pos_wieght"] = 2.0
    code, err = run_train(capsys, "--config", str(write_yaml(tmp_path / "c.yaml", raw)))
    assert code == 2
    assert "model.rpn.cls_pos_wieght: unknown key" in err and "Did you mean 'cls_pos_weight'" in err


@pytest.mark.parametrize("key,value,expect", [
    ("solver.lr", "fast", "solver.lr"),               # wrong type
    ("solver.lr", -0.1, "greater than 0"),             # out of range
    ("model.rpn.positive_fraction", 0.0, "model.rpn.positive_fraction"),
    ("model.rpn.bg_iou_thresh", 0.9, "must be <= rpn.fg_iou_thresh"),
    ("monitor.score_thresholds", [0.5, 0.3], "sorted ascending"),
    ("model.roi.score_thresh", 1.5, "model.roi.score_thresh"),
    ("model.rpn.cls_loss", {"type": "ce"}, "rpn.cls_loss.type must be 'bce' or 'focal', got 'ce'"),
    ("model.roi.cls_loss", {"type": "bce"}, "roi.cls_loss.type must be 'ce' or 'focal', got 'bce'"),
    ("model.rpn.cls_loss", {"logit_adjust": 1.0}, "the RPN has one class"),
])
def test_bad_values_exit_2(tmp_path, capsys, key, value, expect):
    section, *rest = key.split(".")
    raw = tiny_dict(tmp_path)
    node = raw[section]
    for part in rest[:-1]:
        node = node.setdefault(part, {})
    node[rest[-1]] = value
    code, err = run_train(capsys, "--config", str(write_yaml(tmp_path / "c.yaml", raw)))
    assert code == 2 and expect in err and "c.yaml" in err and "Traceback" not in err


def test_missing_paths_named(tmp_path, capsys):
    raw = tiny_dict(tmp_path)
    raw["data"] = {"train": {"ann_file": "nope.json", "img_dir": str(tmp_path)},
                   "val": {"ann_file": "nope.json", "img_dir": str(tmp_path)}}
    code, err = run_train(capsys, "--config", str(write_yaml(tmp_path / "c.yaml", raw)))
    assert code == 2 and "data.train.ann_file" in err and "nope.json" in err


def test_base_inheritance_deep_merges(tmp_path):
    write_yaml(tmp_path / "base.yaml", tiny_dict(tmp_path))
    (tmp_path / "sub").mkdir()
    child = write_yaml(tmp_path / "sub" / "child.yaml", {"_base_": "../base.yaml", "solver": {"lr": 0.005}})
    cfg = load_config(child)
    assert cfg.solver.lr == 0.005 and cfg.solver.max_iters == 4  # merged, not replaced
    assert cfg.model.backbone.fpn_channels == 16


def test_base_missing_and_cycle(tmp_path, capsys):
    child = write_yaml(tmp_path / "c.yaml", {"_base_": "missing.yaml"})
    code, err = run_train(capsys, "--config", str(child))
    assert code == 2 and "_base_ file 'missing.yaml' does not exist" in err
    write_yaml(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    write_yaml(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    code, err = run_train(capsys, "--config", str(tmp_path / "a.yaml"))
    assert code == 2 and "_base_ cycle" in err


def test_overrides(tmp_path, capsys):
    path = write_yaml(tmp_path / "c.yaml", tiny_dict(tmp_path))
    cfg = load_config(path, ["solver.max_iters=200", "model.roi.cls_pos_weight=3.0", "monitor.score_thresholds=[0.1,0.9]"])
    assert cfg.solver.max_iters == 200 and cfg.model.roi.cls_pos_weight == 3.0
    assert cfg.monitor.score_thresholds == [0.1, 0.9]
    with pytest.raises(UserError, match="no key 'cls_pos_wieght' in model.roi. Did you mean 'cls_pos_weight'"):
        load_config(path, ["model.roi.cls_pos_wieght=3"])
    code, err = run_train(capsys, "--config", str(path), "solver.nope=1")
    assert code == 2 and "no key 'nope' in solver" in err


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", tiny_dict(tmp_path)), ["solver.lr=0.003"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["solver"]["lr"] == 0.003


def test_cls_loss_keeps_its_head_default_type(tmp_path):
    """`model.rpn.cls_loss.gamma=3` alone keeps the head's own type (bce for the RPN, ce for the RoIs)."""
    cfg = tiny_config(tmp_path, model={"rpn": {"cls_loss": {"gamma": 3.0}}, "roi": {"cls_loss": {"gamma": 3.0}}})
    assert (cfg.model.rpn.cls_loss.type, cfg.model.roi.cls_loss.type) == ("bce", "ce")
    assert cfg.model.rpn.cls_loss.gamma == cfg.model.roi.cls_loss.gamma == 3.0

