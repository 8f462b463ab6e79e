"""divergence: absolute evidence that the updates overshoot, named before its symptoms."""

from __future__ import annotations

import pytest

from rcnn_trainer.config_monitor import DivergenceLimits
from rcnn_trainer.monitor.alarms import Alarm
from rcnn_trainer.monitor.checks.divergence import check_divergence

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
        monitor.state.checks = judgment + 1
        shown.append(monitor._causes_before_symptoms(found, iteration=10 * (judgment + 1)))
    assert [[a.name for a in alarms] for a in shown for alarms in [a]] == [["divergence"], [], [], ["collapse"]]
    later = shown[-1][0]  # past the memory: the symptom says which cause it follows and carries its advice
    assert "follows from divergence at iter 10" in later.why and later.change == ["solver.lr: 0.05"]


# ------------------------------------------------------------------ improving, not yet there
def test_on_course_needs_a_steady_rise_that_reaches_health_in_the_budget():
    from rcnn_trainer.monitor.trend import on_course

    climbing = [0.12, 0.15, 0.18, 0.21]  # the healthy digits run's true-class share, 3 points a judgment
    assert on_course(climbing, 0.5, remaining=10) == pytest.approx(0.51)
    assert on_course(climbing, 0.5, remaining=5) is None  # would not get there before the run ends
    assert on_course([0.12, 0.15, 0.14, 0.21], 0.5, remaining=50) is None  # noise goes both ways
    assert on_course([0.30, 0.28, 0.26, 0.24], 0.15, remaining=5, rising=False) == pytest.approx(0.14)


def test_class_confusion_waits_while_the_true_class_climbs(tmp_path):
    import math

    from conftest import tiny_config

    from rcnn_trainer.monitor.health import build_health_monitor
    from rcnn_trainer.monitor.probe import ClassDiagnosis, ProbeResult
    from rcnn_trainer.monitor.threshold_counts import ThresholdCounts

    def probes(correct):
        return [ProbeResult(ThresholdCounts((0.05, 0.3, 0.5, 0.7), (1.0, 0.1, 0.0, 0.0), 3.0),
                            ClassDiagnosis(fg_mass=0.8, correct=c, accuracy=math.nan, margin=0.1, spread=0.1))
                for c in correct]

    monitor = build_health_monitor(tiny_config(tmp_path))
    confusion = Alarm("class_confusion", "confused", "capacity", ["model.roi.representation_size: 1024"])
    kept = monitor._hold_while_improving([confusion], [], probes([0.12, 0.15, 0.18, 0.21]), remaining=12)
    assert kept == [] and "true class share 0.12 -> 0.21" in monitor.improving()[0]
    stuck = monitor._hold_while_improving([confusion], [], probes([0.12, 0.13, 0.12, 0.13]), remaining=12)
    assert stuck == [confusion] and monitor.improving() == []
