"""Training scenarios: each pathology, provoked through the config or an injection on tiny
synthetic data, raises its alarm with its numbers and the key to change."""

from __future__ import annotations

import torch

from conftest import tiny_config
from rcnn_trainer.train.metrics_log import MetricsLog
from rcnn_trainer.train.trainer import train
from rcnn_trainer.errors import TrainingStopped
from rcnn_trainer.model.roi_heads import BoxHeads

import pytest

SHORT = {"solver": {"max_iters": 12, "warmup_iters": 2}, "monitor": {"period": 2, "sustain": 3},
         "train": {"log_period": 1, "checkpoint_period": 100}}


def run(tmp_path, **updates):
    messages = []
    cfg = tiny_config(tmp_path, **{k: {**SHORT.get(k, {}), **updates.get(k, {})} for k in SHORT.keys() | updates.keys()})
    train(cfg, log=messages.append, progress=False)
    alarms = [l for l in MetricsLog(tmp_path / "run" / "metrics.jsonl").read() if l["type"] == "alarm"]
    return alarms, "\n".join(messages)


def named(alarms, name):
    found = [a for a in alarms if a["name"] == name]
    assert found, f"no {name} alarm among {[a['name'] for a in alarms]}"
    return found[0]


def test_injected_normalization_bug(tmp_path, after_forward):
    def sum_instead_of_mean(it, losses):
        losses["loss_rpn_cls"] = losses["loss_rpn_cls"] * 128  # what dividing by 1 instead of 128 anchors does
    after_forward(sum_instead_of_mean)
    alarms, out = run(tmp_path, solver={"max_iters": 2})
    alarm = named(alarms, "initial_loss_scale")
    assert "loss_rpn_cls = " in alarm["seen"] and "expected about 0.69" in alarm["seen"]
    assert any(c.startswith("model.rpn.cls_loss.weight") for c in alarm["change"])
    assert "ALARM [initial_loss_scale]" in out


def test_box_loss_weight_50x_dominates(tmp_path):
    alarms, _ = run(tmp_path, model={"roi": {"box_loss": {"weight": 50.0}}}, solver={"max_iters": 24},
                    monitor={"period": 2, "sustain": 2})
    ratio = named(alarms, "loss_weight_ratio")
    assert ratio["iter"] == 1 and "model.roi.box_loss.weight = 50 is 50x" in ratio["seen"]
    alarm = named(alarms, "dominant_loss")
    assert "loss_roi_box is" in alarm["seen"] and alarm["change"][0].startswith("model.roi.box_loss.weight: lower it")


def test_vanishing_lr(tmp_path):
    alarms, out = run(tmp_path, solver={"lr": 1e-9})
    alarm = named(alarms, "vanishing_lr")
    assert "(base 1.00e-09)" in alarm["seen"] and alarm["change"][0].startswith("solver.lr: raise it")
    assert "ALARM [vanishing_lr] again" in out  # rate-limited: summarised, not reprinted
    # the cause is named, not its symptoms: no "classes confused" etc. in the same judgment
    from rcnn_trainer.monitor.health import SYMPTOMS_OF_NO_LEARNING
    lr_iters = {a["iter"] for a in alarms if a["name"] == "vanishing_lr"}
    assert not [a for a in alarms if a["iter"] in lr_iters and a["name"] in SYMPTOMS_OF_NO_LEARNING]


def test_constant_regressor(tmp_path, monkeypatch):
    """A real constant box head (zero weights, frozen, a constant bias): its deltas do not depend
    on the RoI, so the regressor_collapse check must fire; nothing downstream is patched."""
    import rcnn_trainer.train.run_setup as trainer_module

    real_build = trainer_module.build_model

    def build_with_constant_regressor(cfg):
        model = real_build(cfg)
        bbox_pred = model.roi_heads.box_predictor.bbox_pred
        with torch.no_grad():
            bbox_pred.weight.zero_()
            bbox_pred.bias.copy_(torch.tensor([0.5, -0.5, 0.3, 0.2]).repeat(bbox_pred.bias.numel() // 4))
        bbox_pred.weight.requires_grad_(False)
        bbox_pred.bias.requires_grad_(False)
        return model

    monkeypatch.setattr(trainer_module, "build_model", build_with_constant_regressor)
    # a looser RoI match gives the untrained tiny RPN's proposals positives with varying targets
    alarms, _ = run(tmp_path, solver={"max_iters": 10}, model={"roi": {"fg_iou_thresh": 0.3, "bg_iou_thresh": 0.3}})
    alarm = named(alarms, "regressor_collapse")
    assert "std of predicted / target box deltas 0.000" in alarm["seen"] and alarm["change"][0].startswith("solver.lr")


def test_collapse_through_config_stops(tmp_path):
    background_swamps = {"rpn": {"cls_pos_weight": 0.01, "positive_fraction": 0.02},
                         "roi": {"cls_pos_weight": 0.01, "positive_fraction": 0.02}}
    with pytest.raises(TrainingStopped, match="collapse alarm"):
        run(tmp_path, model=background_swamps, solver={"max_iters": 40, "lr": 0.02},
            monitor={"period": 4, "collapse": {"patience": 2, "action": "stop"}})
    alarms = [l for l in MetricsLog(tmp_path / "run" / "metrics.jsonl").read() if l["type"] == "alarm"]
    alarm = named(alarms, "collapse")
    assert "detections/image at the lowest threshold" in alarm["seen"]
    assert any(c.startswith("model.roi.cls_pos_weight") for c in alarm["change"])


def test_clipping_every_step_is_reported(tmp_path):
    alarms, _ = run(tmp_path, solver={"clip_grad_norm": 1e-4, "max_iters": 4})
    assert "100% of steps clipped" in named(alarms, "gradients")["seen"]


def test_healthy_default_config_raises_no_alarm(tmp_path):
    """The shipped config.yaml, shortened to 140 iterations (the monitor then judges every 10,
    9 times after its 50-iteration warmup): no alarm, no preflight finding. The full 600-iteration
    run is the `healthy` scenario of tools/pathology_suite.py (README)."""
    from rcnn_trainer.config_loader import load_config

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "config.yaml", [f"output_dir={tmp_path / 'run'}", "solver.max_iters=140"])
    messages = []
    train(cfg, log=messages.append, progress=False)
    lines = MetricsLog(tmp_path / "run" / "metrics.jsonl").read()
    assert [l for l in lines if l["type"] in ("alarm", "preflight")] == []
    assert lines[-1]["type"] == "summary" and lines[-1]["alarms"] == {}
    assert not any("ALARM" in m or "WARNING" in m for m in messages)
