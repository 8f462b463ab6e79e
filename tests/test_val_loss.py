"""Validation loss at every evaluation, and the overfitting alarm it feeds."""

from __future__ import annotations

import pytest

from conftest import tiny_config
from rcnn_trainer.train.metrics_log import MetricsLog
from rcnn_trainer.train.trainer import train
from rcnn_trainer.model.build import build_loss_weights
from rcnn_trainer.monitor.checks import check_overfitting

quiet = lambda _msg: None


def evals(val, train, ap=None):
    ap = ap or [0.3 + 0.005 * i for i in range(len(val))]
    return [{"iter": 10 * (i + 1), "val_loss": v, "train_loss": t, "AP": a} for i, (v, t, a) in enumerate(zip(val, train, ap))]


def test_overfitting_check_reads_rising_val_loss_and_falling_ap():
    assert check_overfitting(evals([1.0, 0.9, 0.95, 1.02], [2.0, 1.5, 1.2, 1.0])).name == "overfitting"
    assert check_overfitting(evals([1.0, 0.9, 0.95, 0.93], [2.0, 1.5, 1.2, 1.0])) is None  # one rise is noise
    assert check_overfitting(evals([1.0, 0.9, 0.91, 0.92], [2.0, 1.5, 1.2, 1.0])) is None  # within min_rise
    assert check_overfitting(evals([1.0, 0.9, 0.95, 1.02], [2.0, 1.5, 1.6, 2.1])) is None  # training got worse too
    # early in a healthy run (pathology suite, healthy digits): val loss up while AP climbs
    assert check_overfitting(evals([0.70, 0.85, 1.19], [1.2, 1.1, 1.0], ap=[0.001, 0.007, 0.055])) is None
    falling_ap = check_overfitting(evals([1.0, 0.9, 0.8, 0.7], [2.0, 1.5, 1.2, 1.0], ap=[0.3, 0.5, 0.45, 0.44]))
    assert falling_ap is not None and "below its best 0.500" in falling_ap.seen
    assert "model_best.pth" in falling_ap.change[0]


def test_every_evaluation_logs_the_val_loss_with_the_training_weights(tmp_path):
    train(tiny_config(tmp_path, train={"eval_period": 2}), log=quiet, progress=False)
    lines = [l for l in MetricsLog(tmp_path / "run" / "metrics.jsonl").read() if l["type"] == "eval"]
    assert [l["iter"] for l in lines] == [2, 4]
    weights = build_loss_weights(tiny_config(tmp_path).model).final()
    for line in lines:
        terms = {k[len("val/"):]: v for k, v in line.items() if k.startswith("val/loss_")}
        assert set(terms) == {"loss_rpn_cls", "loss_rpn_box", "loss_roi_cls", "loss_roi_box"}
        assert line["val/loss"] == pytest.approx(sum(weights[n] * v for n, v in terms.items()), rel=1e-5)


def test_a_tiny_training_set_raises_overfitting(tmp_path):
    """Two training images, a constant lr: the training loss falls, the val loss on six other
    images rises from iteration 30 on (measured: 3.85 at 30 -> 5.18 at 50 -> 5.56 at 80)."""
    cfg = tiny_config(tmp_path, data={"synthetic": {"num_train": 2, "num_val": 6, "image_size": 64, "seed": 3},
                                      "hflip_prob": 0.0},
                      solver={"optimizer": "adamw", "lr": 0.002, "max_iters": 50, "warmup_iters": 5,
                              "schedule": "constant"},
                      train={"eval_period": 10, "checkpoint_period": 1000, "log_period": 10}, monitor={"period": 10})
    train(cfg, log=quiet, progress=False)
    alarms = [l for l in MetricsLog(tmp_path / "run" / "metrics.jsonl").read() if l["type"] == "alarm"]
    assert "overfitting" in {a["name"] for a in alarms}
    # the same run read one evaluation at a time: the final one (the only one with eval_period 0)
    # finds the val loss several times the training loss and names the levers of small datasets
    gaps = [a for a in alarms if a["name"] == "generalization_gap"]
    assert 50 in [a["iter"] for a in gaps], [(a["iter"], a["seen"]) for a in gaps]
    final = next(a for a in gaps if a["iter"] == 50)
    assert "x the training loss" in final["seen"]
    assert [c.split(":")[0] for c in final["change"][:4]] == [
        "model.backbone.weights", "data.augment.*", "solver.max_iters", "data.tiling"]
