"""Unit tests for behaviour the end-to-end runs only pass through: the lr schedule, when the
health monitor judges what, checkpoint pruning and model_best, period means, empty targets."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_config
from rcnn_trainer.config import SolverConfig
from rcnn_trainer.runtime import checkpoint as ckpt_io
from rcnn_trainer.train.metrics_log import MetricsLog
from rcnn_trainer.train.optim import build_scheduler, lr_multiplier
from rcnn_trainer.train.trainer import train
from rcnn_trainer.losses.weighting import LOSS_NAMES
from rcnn_trainer.model import stats as S
from rcnn_trainer.model.build import build_model
from rcnn_trainer.monitor.health import build_health_monitor
from rcnn_trainer.monitor.probe import ClassDiagnosis, ProbeResult
from rcnn_trainer.monitor.threshold_counts import ThresholdCounts
from rcnn_trainer.monitor.window import window_means

quiet_log = lambda _msg: None


# ------------------------------------------------------------------ lr schedule
@pytest.mark.parametrize("schedule, after_warmup", [
    ("constant", {10: 1.0, 50: 1.0, 99: 1.0}),
    ("multistep", {10: 1.0, 49: 1.0, 50: 0.1, 79: 0.1, 80: 0.01, 99: 0.01}),
    ("cosine", {50: 0.5, 100: 0.0}),
])
def test_lr_multiplier_warms_up_then_follows_the_schedule(schedule, after_warmup):
    solver = SolverConfig(schedule=schedule, warmup_iters=10, warmup_factor=0.001, max_iters=100, steps=[50, 80],
                          gamma=0.1)
    schedule_at = lambda it: {"constant": 1.0, "multistep": 1.0,
                              "cosine": 0.5 * (1 + math.cos(math.pi * it / 100))}[schedule]
    # warmup: linear from warmup_factor to 1, times the schedule's own factor
    assert lr_multiplier(0, solver) == pytest.approx(0.001 * schedule_at(0))
    assert lr_multiplier(5, solver) == pytest.approx((0.001 * 0.5 + 0.5) * schedule_at(5))
    for iteration, expected in after_warmup.items():
        assert lr_multiplier(iteration, solver) == pytest.approx(expected, abs=1e-12), iteration
    # the scheduler the trainer builds applies exactly these multipliers, step by step
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.02)
    scheduler = build_scheduler(optimizer, solver)
    for iteration in range(100):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * lr_multiplier(iteration, solver))
        optimizer.step()
        scheduler.step()


# ------------------------------------------------------------------ period means
def test_window_means_skip_nan_and_keep_keys_missing_from_the_last_record():
    records = [{"loss": 1.0, "roi/pred_iou": math.nan, "clipped": True, "grad_norm": 2.0},
               {"loss": 3.0, "roi/pred_iou": 0.5, "clipped": False, "grad_norm": 4.0},
               {"loss": 5.0, "roi/pred_iou": math.nan, "clipped": False, "nonfinite": True}]  # a skipped step
    mean = window_means(records)
    assert mean["loss"] == 3.0 and mean["roi/pred_iou"] == 0.5
    assert mean["clipped"] == pytest.approx(1 / 3) and mean["grad_norm"] == 3.0
    assert math.isnan(window_means([{"x": math.nan}, {"x": math.nan}])["x"])


# ------------------------------------------------------------------ health monitor: what runs when
def period_mean(**overrides) -> dict:
    """A healthy-looking period mean with every statistic the checks read."""
    mean = {"loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "clipped": 0.0, S.IMAGES: 2.0, S.GT_PER_IMAGE: 3.0,
            S.RPN_POS: 20.0, S.RPN_NEG: 200.0, S.ROI_POS: 30.0, S.ROI_NEG: 100.0, S.RPN_CLS_FACTOR: 256.0,
            S.RPN_BOX_FACTOR: 256.0, S.ROI_CLS_FACTOR: 128.0, S.ROI_BOX_FACTOR: 128.0, S.RPN_BOX_PER_POS: 0.1,
            S.ROI_BOX_PER_POS: 0.1, S.RPN_PRED_IOU: 0.7, S.ROI_PRED_IOU: 0.8, S.ROI_PROPOSAL_IOU: 0.65,
            S.ROI_FG_ARGMAX: 0.3, S.ROI_DELTA_STD_RATIO: 0.9, S.ROI_DELTA_CORR: 0.9,
            **{n: 0.25 for n in LOSS_NAMES}, **{f"{n}_weighted": 0.25 for n in LOSS_NAMES}}
    mean.update(overrides)
    return mean


def collapsed_probe() -> ProbeResult:
    return ProbeResult(ThresholdCounts((0.05, 0.5), (0.0, 0.0), 3.0),
                       ClassDiagnosis(fg_mass=0.02, correct=math.nan, accuracy=math.nan, margin=math.nan,
                                      spread=math.nan))


def test_probe_checks_wait_for_warmup_then_fire(tmp_path):
    cfg = tiny_config(tmp_path, solver={"warmup_iters": 30, "max_iters": 100, "lr": 1e-3})
    monitor = build_health_monitor(cfg)
    monitor.first_step(period_mean())
    fired = {}
    for iteration in range(10, 101, 10):
        alarms = monitor.period(iteration, 100, [period_mean()], period_mean(), collapsed_probe(), None)
        fired[iteration] = {a.name for a in alarms}
    assert not any("collapse" in names for it, names in fired.items() if it <= 30)  # warmup: not judged
    # judged from the first period after warmup; collapse needs `patience` (3) checks in a row
    assert "collapse" not in fired[50] and "collapse" in fired[60]


def test_vanishing_lr_holds_back_the_symptoms_of_not_learning(tmp_path):
    cfg = tiny_config(tmp_path, solver={"warmup_iters": 10, "max_iters": 100, "lr": 1e-3})
    monitor = build_health_monitor(cfg)
    monitor.first_step(period_mean())
    names = []
    for iteration in range(20, 61, 10):
        alarms = monitor.period(iteration, 100, [period_mean(lr=1e-9)], period_mean(lr=1e-9), collapsed_probe(), None)
        names.append({a.name for a in alarms})
    assert all("vanishing_lr" in n for n in names)
    assert not any(n & {"collapse", "low_confidence", "class_confusion", "regressor_collapse"} for n in names)
    # the same run with a normal lr names the symptom
    healthy_lr = build_health_monitor(cfg)
    healthy_lr.first_step(period_mean())
    seen = set()
    for iteration in range(20, 61, 10):
        seen |= {a.name for a in healthy_lr.period(iteration, 100, [period_mean()], period_mean(), collapsed_probe(),
                                                    None)}
    assert "collapse" in seen and "vanishing_lr" not in seen


# ------------------------------------------------------------------ checkpoints
def test_prune_keeps_the_newest_periodic_checkpoints_and_removes_stale_temporaries(tmp_path):
    for it in (2, 4, 6, 8, 10):
        (tmp_path / f"ckpt_{it:07d}.pth").write_bytes(b"x")
    (tmp_path / ".ckpt_0000012.pth.tmp-123").write_bytes(b"half")  # an older version's temporary
    (tmp_path / ".ckpt_0000014.pth.k3j_x9a1.tmp").write_bytes(b"half")  # atomic_io's (mkstemp)
    (tmp_path / "model_best.pth").write_bytes(b"best")
    ckpt_io.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000008.pth", "ckpt_0000010.pth", "model_best.pth"]


def test_model_best_is_the_checkpoint_of_the_best_periodic_evaluation(tmp_path):
    cfg = tiny_config(tmp_path, solver={"max_iters": 6}, train={"eval_period": 2, "checkpoint_period": 2,
                                                                "keep_checkpoints": 1})
    train(cfg, log=quiet_log, progress=False)
    run = tmp_path / "run"
    evals = [l for l in MetricsLog(run / "metrics.jsonl").read() if l["type"] == "eval"]
    assert [e["iter"] for e in evals] == [2, 4, 6]
    best = max(evals, key=lambda e: e["AP"])  # the first of equal APs: only a better AP replaces it
    first_best = next(e for e in evals if e["AP"] == best["AP"])
    assert ckpt_io.load_checkpoint(run / "model_best.pth")["iteration"] == first_best["iter"]
    assert [p.name for p in ckpt_io.periodic_checkpoints(run / "checkpoints")] == ["ckpt_0000006.pth"]


# ------------------------------------------------------------------ empty targets, per head
def test_a_batch_without_objects_gives_finite_losses_and_zero_box_terms(tmp_path):
    model = build_model(tiny_config(tmp_path).model).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images]
    losses, stats = model(images, targets)
    for name in ("loss_rpn_box", "loss_roi_box"):
        assert losses[name].item() == 0.0, name  # nothing to regress
    for name in ("loss_rpn_cls", "loss_roi_cls"):
        assert math.isfinite(losses[name].item()) and losses[name].item() > 0, name  # background still learned
    assert float(stats[S.RPN_POS]) == 0 and float(stats[S.ROI_POS]) == 0 and float(stats[S.RPN_NEG]) > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
