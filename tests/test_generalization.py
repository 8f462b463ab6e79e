"""generalization_gap: one evaluation (the final one included) read against the training loss
and the probe's counts, on constructed numbers; the end-to-end provocation is in test_val_loss.py."""

from __future__ import annotations

import math

from rcnn_trainer.config import MonitorConfig
from rcnn_trainer.config_monitor import GeneralizationLimits
from rcnn_trainer.monitor.checks import check_generalization_gap, generalization_levers
from rcnn_trainer.monitor.health import HealthMonitor, HealthSettings
from rcnn_trainer.monitor.probe import ClassDiagnosis, ProbeResult
from rcnn_trainer.monitor.state import MonitorState
from rcnn_trainer.monitor.threshold_counts import ThresholdCounts

LEVERS = generalization_levers()


def probe(dets_at_half: float, gt: float) -> ProbeResult:
    return ProbeResult(ThresholdCounts((0.05, 0.3, 0.5, 0.7), (dets_at_half * 2, dets_at_half * 1.2, dets_at_half,
                                                               dets_at_half * 0.7), gt),
                       ClassDiagnosis(fg_mass=0.8, correct=1.0, accuracy=1.0, margin=1.0, spread=0.0))


def evaluation(val: float, train: float, ap50: float = 0.9, ap: float = 0.6) -> dict:
    return {"iter": 300, "val_loss": val, "train_loss": train, "AP": ap, "AP50": ap50}


def test_a_val_loss_far_above_the_training_loss_fires_and_names_the_levers():
    # the aerial run: val 5.03 against 1.08, val rpn_cls 2.20 against 0.014
    alarm = check_generalization_gap(evaluation(5.03, 1.08, ap50=0.105, ap=0.028), None, LEVERS,
                                     val_terms={"loss_rpn_cls": 2.20, "loss_roi_cls": 1.5},
                                     train_terms={"loss_rpn_cls": 0.014, "loss_roi_cls": 0.5})
    assert alarm.name == "generalization_gap"
    assert "4.7x the training loss 1.080" in alarm.seen and "widest: rpn_cls 2.200 vs 0.014" in alarm.seen
    keys = [item.split(":")[0] for item in alarm.change]
    assert keys[:4] == ["model.backbone.weights", "data.augment.*", "solver.max_iters", "data.tiling"]
    assert "model.init_from" in alarm.change[0]


def test_healthy_gaps_stay_silent():
    # the default run (config.yaml, 600 iterations): val 0.324 against 0.209, AP50 0.965
    assert check_generalization_gap(evaluation(0.324, 0.209, ap50=0.965), probe(3.4, 3.4), LEVERS) is None
    # a ratio on small numbers: 3x, but 0.2 apart
    assert check_generalization_gap(evaluation(0.3, 0.1), None, LEVERS) is None
    # far apart but below the ratio
    assert check_generalization_gap(evaluation(3.0, 1.5), None, LEVERS) is None
    assert check_generalization_gap(evaluation(math.nan, 1.0), None, LEVERS) is None


def test_val_ap_far_below_what_the_probe_promises_fires():
    limits = GeneralizationLimits()
    # the training images look solved (17.0 detections at 0.5 against 17.2 GT), val AP50 0.105
    alarm = check_generalization_gap(evaluation(1.2, 1.0, ap50=0.105), probe(17.0, 17.2), LEVERS, limits)
    assert alarm is not None and "17.0 detections per image at score >= 0.5 against 17.2" in alarm.seen
    assert "val loss" not in alarm.seen  # the losses alone did not fire
    # the probe does not look solved (half the objects found): no promise to break
    assert check_generalization_gap(evaluation(1.2, 1.0, ap50=0.105), probe(8.0, 17.2), LEVERS, limits) is None
    # solved and val AP50 0.5: a gap, not a far one
    assert check_generalization_gap(evaluation(1.2, 1.0, ap50=0.5), probe(17.0, 17.2), LEVERS, limits) is None
    assert check_generalization_gap(evaluation(1.2, 1.0, ap50=None), probe(17.0, 17.2), LEVERS, limits) is None


def test_levers_put_what_the_run_uses_last():
    used = generalization_levers(pretrained=True, augmenting=True, tiling=False)
    keys = [item.split(":")[0] for item in used]
    assert keys == ["solver.max_iters", "data.tiling", "model.backbone.weights", "data.augment.*", "data.train"]
    assert "already" in used[2] and "already" in used[3]


def test_the_final_evaluation_is_judged_without_periodic_ones():
    """train.eval_period 0: one evaluation, at the end; overfitting needs three, this check one."""
    monitor = HealthMonitor(HealthSettings(num_classes=1, rpn_cls=None, roi_cls=None, box_types={}, base_lr=1e-3,
                                           optimizer="adamw", batch_size=8, warmup_iters=10, loss_weights={},
                                           monitor=MonitorConfig(), advice=None))
    monitor.state = MonitorState(history=[{"loss": 1.08, "loss_rpn_cls": 0.014}],
                                 probe=[probe(17.0, 17.2).as_state()])
    alarms = monitor.at_evaluation(300, 5.03, 0.028, ap50=0.105, val_terms={"loss_rpn_cls": 2.2})
    assert [a.name for a in alarms] == ["generalization_gap"]
    assert "4.7x" in alarms[0].seen and "17.0 detections" in alarms[0].seen
    assert monitor.state.evals[-1]["AP50"] == 0.105
