"""model.init_from: a new run from a detector trained on other classes (or torchvision's)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from conftest import TORCHVISION_SIZES, tiny_config, tiny_dict
from rcnn_trainer.cli import train_main
from rcnn_trainer.config_loader import validate_config
from rcnn_trainer.data.checkpoint_settings import settings_from_checkpoint
from rcnn_trainer.data.loader import build_dataset, resolve_splits
from rcnn_trainer.errors import UserError
from rcnn_trainer.model.build import build_model
from rcnn_trainer.model.init_from import initialize_from


def test_four_classes_to_ten_loads_the_matching_tensors_and_names_the_rest(tmp_path):
    torch.manual_seed(0)
    source = build_model(tiny_config(tmp_path, model={"num_classes": 4}).model)
    torch.save({"model": source.state_dict(), "iteration": 100}, tmp_path / "four.pth")  # a checkpoint's layout
    torch.manual_seed(1)
    target = build_model(tiny_config(tmp_path, model={"num_classes": 10}).model)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    said = []
    report = initialize_from(target, tmp_path / "four.pth", said.append)
    after, theirs = target.state_dict(), source.state_dict()
    for name in report.loaded:
        assert torch.equal(after[name], theirs[name]), name
    assert set(report.reinitialized) == {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
                                         "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"}
    for name in report.reinitialized:  # kept their own initialization
        assert torch.equal(after[name], before[name]), name
    assert report.unused == report.reinitialized  # the 4-class versions of the same layers
    assert any("re-initialized 4: roi_heads.box_predictor (4)" in line for line in said)


def test_a_torchvision_state_dict_and_a_new_mask_head(tmp_path):
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    torch.save({f"module.{k}": v for k, v in FasterRCNN(backbone, num_classes=91).state_dict().items()},
               tmp_path / "tv.pth")  # saved from a DDP wrapper, as the reference scripts do
    cfg = tiny_config(tmp_path, model={**TORCHVISION_SIZES, "num_classes": 3,
                                       "mask": {"enabled": True, "num_convs": 2, "conv_channels": 64}})
    report = initialize_from(build_model(cfg.model), tmp_path / "tv.pth", lambda _: None)
    assert "backbone.body.conv1.weight" in report.loaded and "rpn.head.conv.0.0.weight" in report.loaded
    assert any(n.startswith("roi_heads.mask_head.") for n in report.reinitialized)
    assert "roi_heads.box_head.fc6.weight" in report.loaded  # class-independent: kept


def test_a_file_that_matches_almost_nothing_is_exit_2(tmp_path, capsys):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match=r"only 0% of the model's parameters match"):
        initialize_from(build_model(tiny_config(tmp_path).model), tmp_path / "other.pth", print)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(UserError, match="holds no state dict"):
        initialize_from(build_model(tiny_config(tmp_path).model), tmp_path / "list.pth", print)


AUTO_HEAD = {"num_classes": "auto", "backbone": {"fpn_channels": "auto"}, "anchors": {"sizes": "auto"},
             "roi": {"representation_size": "auto", "batch_size_per_image": "auto"}}


def ten_class_data(cfg: dict, folder) -> dict:
    """The synthetic images with their boxes spread over 10 categories (data.train / data.val)."""
    splits, data = resolve_splits(validate_config(cfg, source="test")), {"synthetic": None}
    for split, (ann_file, img_dir) in splits.items():
        coco = json.loads(ann_file.read_text())
        coco["categories"] = [{"id": i + 1, "name": f"c{i}"} for i in range(10)]
        for ann in coco["annotations"]:
            ann["category_id"] = ann["id"] % 10 + 1
        (folder / f"ten_{split}.json").write_text(json.dumps(coco))
        data[split] = {"ann_file": str(folder / f"ten_{split}.json"), "img_dir": str(img_dir)}
    return data


def test_training_from_a_checkpoint_of_other_classes(tmp_path, capsys):
    """rcnn-train with model.init_from, 4 classes -> 10: the `auto` head takes the checkpoint's sizes (not the
    wide head of 10 classes), so all but the class-dependent predictor loads and the first RPN loss is below
    the one from scratch; a set value that contradicts the checkpoint is named; the first-step check stays
    quiet about the trained heads' low losses."""
    first = tiny_dict(tmp_path / "a", solver={"max_iters": 6}, model=AUTO_HEAD)
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(first))
    assert train_main(["--config", str(tmp_path / "a.yaml"), "--no-progress"]) == 0
    capsys.readouterr()
    second = tiny_dict(tmp_path / "b", solver={"max_iters": 2}, data=ten_class_data(first, tmp_path),
                       model={**AUTO_HEAD, "roi": {"representation_size": "auto", "batch_size_per_image": 16},
                              "init_from": str(tmp_path / "a" / "run" / "model_final.pth")})
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(second))
    assert train_main(["--config", str(tmp_path / "b.yaml"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    loaded = re.search(r"\[init_from\] loaded \d+ tensors \(([\d.]+)% of the parameters\)", printed)
    assert loaded and float(loaded.group(1)) >= 90.0, printed
    assert "model.roi.batch_size_per_image=16 contradicts the checkpoint's 64" in printed
    assert "model.backbone.fpn_channels: 64" in printed and "narrow_head" not in printed
    runs = [[json.loads(l) for l in (tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines()]
            for run in ("a", "b")]
    scratch, fine_tuned = ([l for l in lines if l["type"] == "train"][0] for lines in runs)
    assert fine_tuned["iter"] == 1 and fine_tuned["loss_rpn_cls"] < scratch["loss_rpn_cls"] - 0.02
    assert not [l for l in runs[1] if l["type"] == "alarm" and l["name"] == "initial_loss_scale"]


def test_auto_settings_from_a_torchvision_state_dict_and_contradictions_named(tmp_path):
    """No config in the file: FPN width, box head and RoIAlign size from the tensors' shapes, the anchors
    torchvision's (with a warning: the tiny data's boxes fit smaller ones); a set aspect-ratio count that
    gives the RPN head another shape is named with its cost."""
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    torch.save(FasterRCNN(backbone, num_classes=91).state_dict(), tmp_path / "tv.pth")
    said = []
    cfg = tiny_config(tmp_path, model={**AUTO_HEAD, "init_from": str(tmp_path / "tv.pth")})
    updates = settings_from_checkpoint(cfg, build_dataset(cfg, "train"), said.append)
    assert updates == {"model.backbone.fpn_channels": 256, "model.roi.representation_size": 1024,
                       "model.anchors.sizes": [[32.0], [64.0], [128.0], [256.0], [512.0]]}
    assert any("WARNING the checkpoint's anchors give" in line for line in said), said
    said.clear()
    cfg = tiny_config(tmp_path, model={**AUTO_HEAD, "init_from": str(tmp_path / "tv.pth"),
                                       "anchors": {"sizes": "auto", "aspect_ratios": [1.0]}, "roi": {"pool_size": 5}})
    updates = settings_from_checkpoint(cfg, build_dataset(cfg, "train"), said.append)
    assert "model.anchors.sizes" not in updates  # not torchvision's 3 per position: fitted to the data
    warned = "\n".join(said)
    assert "anchors per position)=1 contradicts the checkpoint's 3: rpn.head.cls_logits, rpn.head.bbox_pred" in warned
    assert "model.roi.pool_size=5 contradicts the checkpoint's 7: roi_heads.box_head.fc6 (" in warned


def test_trainable_layers_apply_when_init_from_brings_trained_weights(tmp_path):
    from rcnn_trainer.model.build import build_model

    def frozen(**model):
        cfg = tiny_config(tmp_path, model={"backbone": {"norm": "frozen_bn", "trainable_layers": 3}, **model})
        net = build_model(cfg.model)
        return {n.split(".")[1] for n, p in net.backbone.named_parameters() if not p.requires_grad}

    assert frozen() == set()  # from scratch nothing may stay frozen
    assert frozen(init_from=str(tmp_path / "any.pth")) == {"conv1", "layer1"}  # the stem and first stage
