"""divergence: absolute evidence that the updates overshoot, named before its symptoms."""

from __future__ import annotations

from rcnn_trainer.config_monitor import DivergenceLimits
from rcnn_trainer.monitor.alarms import Alarm
from rcnn_trainer.monitor.divergence import check_divergence

COMMON = dict(lr=0.5, base_lr=0.5, optimizer="adamw", batch_size=8, warmup_iters=50, clip_grad_norm=None)


def test_loss_far_above_its_start_is_divergence_with_the_lr_first():
    alarm = check_divergence([3.1, 40.0, 961.7, 500.0], [5.0, 900.0, 3600.0, 2000.0], initial_loss=3.0,
                             expected_initial=2.5, lowest_mean=None, reference_norm=5.0, **COMMON)
    assert alarm is not None and alarm.name == "divergence"
    assert alarm.change[0].startswith("solver.lr: 0.05")
    assert any(c.startswith("solver.clip_grad_norm: 10") for c in alarm.change)
    assert any(c.startswith("solver.warmup_iters") for c in alarm.change)
    assert "grad norm" in alarm.seen and "loss" in alarm.seen


def test_healthy_falling_loss_and_steady_norms_are_quiet():
    assert check_divergence([2.9, 2.5, 2.1, 1.8], [4.0, 6.0, 9.0, 5.0], initial_loss=3.0, expected_initial=2.5,
                            lowest_mean=2.4, reference_norm=4.0, **COMMON) is None


def test_a_run_that_learned_then_blew_up_is_divergence():
    limits = DivergenceLimits()
    losses = [4.0, 5.0, 6.0]  # above the first step's 3.0 and > 4x the best judgment (0.8)
    alarm = check_divergence(losses, [5.0] * 3, initial_loss=3.0, expected_initial=2.5, lowest_mean=0.8,
                             reference_norm=5.0, limits=limits, **COMMON)
    assert alarm is not None and "lowest it reached" in alarm.seen
    # the same rise that stays below the first step's loss is noise, not divergence
    assert check_divergence([1.0, 1.2], [5.0] * 2, initial_loss=3.0, expected_initial=2.5, lowest_mean=0.2,
                            reference_norm=5.0, **COMMON) is None


def test_grad_norms_huge_from_the_first_judgment_count():
    alarm = check_divergence([3.0, 3.1], [500.0, 500.0], initial_loss=3.0, expected_initial=2.5, lowest_mean=None,
                             reference_norm=5.0, **COMMON)
    assert alarm is not None and "100x the first steps" in alarm.seen


def test_sgd_advice_uses_the_batch_size_rule():
    alarm = check_divergence([100.0], [5.0], initial_loss=3.0, expected_initial=None, lowest_mean=None,
                             reference_norm=5.0, **{**COMMON, "optimizer": "sgd", "batch_size": 8})
    assert alarm.change[0].startswith("solver.lr: 0.01 (the linear scaling rule gives 0.01 for 8 images")


def test_symptoms_are_held_back_while_a_cause_is_recent(tmp_path):
    from conftest import tiny_config

    from rcnn_trainer.monitor.health import build_health_monitor

    monitor = build_health_monitor(tiny_config(tmp_path, monitor={"divergence": {"memory": 2}}))
    collapse = Alarm("collapse", "0 detections", "background wins", ["model.roi.cls_pos_weight: raise to 2-5"])
    divergence = Alarm("divergence", "loss 900", "overshoot", ["solver.lr: 0.05"])
    shown = []
    for judgment, found in enumerate([[divergence, collapse], [collapse], [collapse], [collapse]]):
        monitor.state["checks"] = judgment + 1
        shown.append([a.name for a in monitor._causes_before_symptoms(found)])
    assert shown == [["divergence"], [], [], ["collapse"]]
