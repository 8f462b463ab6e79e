"""Each health check alone, on hand-made numbers: it fires on the pathology and not on a healthy series."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from rcnn_trainer.losses.settings import ClsLoss
from rcnn_trainer.monitor import checks
from rcnn_trainer.monitor.checks import check_collapse
from rcnn_trainer.monitor.period import PeriodMeans
from rcnn_trainer.monitor.probe import ClassDiagnosis, ProbeResult
from rcnn_trainer.monitor.threshold_counts import ThresholdCounts


def period_record(**values) -> dict:
    """One period's means as the trainer logs them (and the monitor checkpoints them)."""
    base = {"loss": 1.0, "loss_rpn_cls": 0.25, "loss_rpn_box": 0.25, "loss_roi_cls": 0.25, "loss_roi_box": 0.25,
            "loss_rpn_cls_weighted": 0.25, "loss_rpn_box_weighted": 0.25, "loss_roi_cls_weighted": 0.25,
            "loss_roi_box_weighted": 0.25, "rpn/pos_per_image": 20.0, "rpn/neg_per_image": 100.0,
            "roi/pos_per_image": 16.0, "roi/neg_per_image": 48.0, "gt_per_image": 3.0, "roi/pos_proposal_iou": 0.6,
            "rpn/pred_iou": 0.6, "roi/pred_iou": 0.7, "roi/delta_std_ratio": 0.5, "roi/delta_corr": 0.6}
    return {**base, **values}


def period(**values) -> PeriodMeans:
    return PeriodMeans.from_means(period_record(**values))


def test_history_without_a_contract_key_is_an_error():
    incomplete = {k: v for k, v in period_record().items() if k != "roi/pos_per_image"}
    with pytest.raises(KeyError, match="roi/pos_per_image"):
        PeriodMeans.from_means(incomplete)


def test_expected_initial_losses_match_theory():
    record = {"images": 2, "rpn/pos_per_image": 10, "rpn/neg_per_image": 118, "avg_factor/rpn_cls": 256,
              "roi/pos_per_image": 16, "roi/neg_per_image": 48, "avg_factor/roi_cls": 128}
    bce, ce = ClsLoss("bce"), ClsLoss("ce")
    got = checks.expected_initial_losses(record, num_classes=4, rpn_cls=bce, roi_cls=ce)
    assert math.isclose(got["loss_rpn_cls"], math.log(2)) and math.isclose(got["loss_roi_cls"], math.log(5))
    weighted = checks.expected_initial_losses(record, num_classes=4, rpn_cls=ClsLoss("bce", pos_weight=3.0), roi_cls=ce)
    assert math.isclose(weighted["loss_rpn_cls"], math.log(2) * (3 * 20 + 236) / 256)


def test_initial_loss_scale():
    record = {"loss_rpn_cls": 0.7, "loss_roi_cls": 1.6, "loss_rpn_box": 0.02, "loss_roi_box": 0.03}
    expected = {"loss_rpn_cls": math.log(2), "loss_roi_cls": math.log(5)}
    assert checks.check_initial_loss_scale(record, expected) is None
    alarm = checks.check_initial_loss_scale(dict(record, loss_rpn_cls=0.7 * 256), expected)
    assert alarm and "loss_rpn_cls = 179.2" in alarm.seen and "model.rpn.cls_loss.weight" in alarm.change[0]


def test_dominant_term():
    healthy = [period()] * 3
    assert checks.check_dominant_term(healthy, max_share=0.7, sustain=3) is None
    heavy = [period(loss=4.0, loss_roi_box_weighted=3.25)] * 3
    alarm = checks.check_dominant_term(heavy, max_share=0.7, sustain=3)
    assert alarm and "loss_roi_box is 81%" in alarm.seen and alarm.change[0].startswith("model.roi.box_loss.weight")
    assert checks.check_dominant_term(heavy[:2] + healthy[:1], max_share=0.7, sustain=3) is None  # not sustained
    # at equal weights a term's own scale is not the config's doing (CE over 26 classes vs GIoU)
    natural = [period(loss=1.0, loss_roi_cls=0.75, loss_roi_cls_weighted=0.75, loss_rpn_cls=0.1,
                      loss_rpn_cls_weighted=0.1, loss_rpn_box=0.05, loss_rpn_box_weighted=0.05,
                      loss_roi_box=0.1, loss_roi_box_weighted=0.1)] * 3
    assert checks.check_dominant_term(natural, max_share=0.7, sustain=3) is None


def test_flat_term_while_others_fall():
    falling = [period(loss=1.0 - 0.15 * i, loss_rpn_cls=0.25 - 0.05 * i, loss_rpn_cls_weighted=0.25 - 0.05 * i,
                      loss_roi_cls=0.25 - 0.1 * i + 0.0, loss_roi_cls_weighted=0.25 - 0.1 * i) for i in range(5)]
    alarm = checks.check_flat_term(falling, window=5)
    assert alarm and "loss_rpn_box stays" in alarm.seen and "model.rpn.box_loss.weight" in alarm.change[0]
    all_falling = [period(**{k: v * (1 - 0.1 * i) for k, v in period_record().items() if k.startswith("loss")})
                   for i in range(5)]
    assert checks.check_flat_term(all_falling, window=5) is None
    # a term that fell from its highest judgment and levels off is converged, not stuck
    converged = [period(loss_rpn_box=0.031, loss_roi_box=0.031)] + [
        replace(h, terms={**h.terms, "loss_rpn_box": 0.011, "loss_roi_box": 0.011}) for h in falling]
    assert checks.check_flat_term(converged[1:], window=5, first=converged[0]) is None
    assert checks.check_flat_term(converged, window=5) is None
    # the box term of the default run with bf16 (90-210): it rose with the positives and fell back
    # while the refined boxes went from their proposals' IoU 0.59 to 0.81: learning, not stuck
    hump = [replace(h, terms={**h.terms, "loss_roi_box": box, "loss_rpn_box": rpn},
                    weighted={**h.weighted, "loss_roi_box": box, "loss_rpn_box": rpn},
                    loss=box + other, proposal_iou=prop, roi_pred_iou=refined)
            for h, box, other, rpn, prop, refined in zip(
                falling, (0.473, 0.570, 0.671, 0.532, 0.492), (0.6, 0.5, 0.4, 0.3, 0.2), (0.25, 0.2, 0.15, 0.1, 0.05),
                (0.588, 0.594, 0.600, 0.609, 0.613), (0.589, 0.648, 0.732, 0.790, 0.809))]
    assert checks.check_flat_term(hump, window=5) is None
    stuck = [replace(h, proposal_iou=0.6, roi_pred_iou=0.6, delta_corr=0.02) for h in hump]  # a regressor without signal
    assert (alarm := checks.check_flat_term(stuck, window=5)) is not None and "loss_roi_box" in alarm.seen
    # the glyphs in fp32 (bench, seed 42) at 150-210: roi_box level at 0.47 while the refined boxes
    # beat their proposals by 0.07 and the deltas correlate 0.58 with their targets: slow, not stuck
    plateau = [replace(h, proposal_iou=0.63, roi_pred_iou=0.70, delta_corr=0.58) for h in stuck]
    assert checks.check_flat_term(plateau, window=5) is None
    weak = [replace(h, delta_corr=0.3) for h in plateau]  # the deltas barely follow: not evidence enough
    assert (alarm := checks.check_flat_term(weak, window=5)) is not None and "loss_roi_box" in alarm.seen


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou", "wiou"])
def test_stuck_iou_loss(kind):
    stuck = [period(**{"roi/pred_iou": 0.01})] * 3
    alarm = checks.check_stuck_iou_loss(stuck, {"rpn": "smooth_l1", "roi": kind}, sustain=3)
    assert alarm and f"roi {kind}" in alarm.seen and alarm.change[0].startswith("model.roi.box_loss.type")
    assert checks.check_stuck_iou_loss(stuck, {"rpn": "smooth_l1", "roi": "smooth_l1"}, sustain=3) is None
    assert checks.check_stuck_iou_loss([period(**{"roi/pred_iou": 0.4})] * 3, {"roi": kind}, sustain=3) is None


def test_foreground_starvation():
    assert checks.check_foreground_starvation([period()] * 3, sustain=3) is None
    starved = [period(**{"roi/pos_per_image": 0.2, "roi/neg_per_image": 511.8})] * 3
    alarm = checks.check_foreground_starvation(starved, sustain=3)
    assert alarm and "roi positives per image 0.20" in alarm.seen and alarm.change[0].startswith("model.roi.positive_fraction")
    # sparse data: 1.5 positive anchors of 256 for 1.2 objects per image is all the data can give
    sparse = [period(**{"rpn/pos_per_image": 1.5, "rpn/neg_per_image": 254.5, "gt_per_image": 1.2,
                        "roi/pos_per_image": 2.0})] * 3
    assert checks.check_foreground_starvation(sparse, sustain=3) is None


def test_proposal_iou_not_rising():
    flat = [period(**{"roi/pos_proposal_iou": 0.52})] * 6
    assert checks.check_proposal_iou_not_rising(flat).name == "proposal_iou_flat"
    # converged at a healthy level (seen on the default run: 0.594 -> 0.587, 0.588, 0.591): no alarm
    settled = [period(**{"roi/pos_proposal_iou": v}) for v in (0.594, 0.59, 0.589, 0.587, 0.588, 0.591)]
    assert checks.check_proposal_iou_not_rising(settled) is None
    rising = [period(**{"roi/pos_proposal_iou": 0.55 + 0.02 * i}) for i in range(6)]
    assert checks.check_proposal_iou_not_rising(rising) is None
    # judged again at every later period: a gain that is lost again is caught at period 9
    lost = rising + [period(**{"roi/pos_proposal_iou": 0.53})] * 3
    assert checks.check_proposal_iou_not_rising(lost).name == "proposal_iou_flat"
    plateau = rising + [period(**{"roi/pos_proposal_iou": 0.65})] * 6  # healthy: gained, then flat
    assert checks.check_proposal_iou_not_rising(plateau) is None


def test_regressor_collapse():
    assert checks.check_regressor_collapse([period()] * 3, sustain=3) is None
    constant = [period(**{"roi/delta_std_ratio": 0.0, "roi/delta_corr": 0.0})] * 3
    alarm = checks.check_regressor_collapse(constant, sustain=3)
    assert alarm and "std of predicted / target box deltas 0.000" in alarm.seen and alarm.change[0].startswith("solver.lr")
    # a box loss weighted 0 is the cause itself: its key comes first
    unweighted = checks.check_regressor_collapse(constant, sustain=3, box_weight=0.0)
    assert unweighted.change[0].startswith("model.roi.box_loss.weight: raise it from 0")
    # small but following its targets (early training): not a collapse
    early = [period(**{"roi/delta_std_ratio": 0.03, "roi/delta_corr": 0.4})] * 3
    assert checks.check_regressor_collapse(early, sustain=3) is None
    starting = [period(**{"roi/delta_std_ratio": r, "roi/delta_corr": c}) for r, c in ((0.0, 0.0), (0.02, 0.04), (0.04, 0.08))]
    assert checks.check_regressor_collapse(starting, sustain=3) is None

    def trace(pairs):
        return [period(**{"roi/delta_std_ratio": r, "roi/delta_corr": c}) for r, c in pairs]
    # measured, 300-iteration runs at period 15, the three judgments after warmup (iters 60-90):
    # box loss weight 0 (no signal): spread shrinking, correlation noise around 0
    assert checks.check_regressor_collapse(trace([(0.042, -0.006), (0.033, -0.006), (0.030, 0.06)]), sustain=3)
    # the same scenario, another run: not shrinking at every period, but barely moving any box
    assert checks.check_regressor_collapse(trace([(0.038, -0.014), (0.031, 0.033), (0.032, 0.023)]), sustain=3)
    # a constant head (zero weights): float noise that "widens" is no spread
    assert checks.check_regressor_collapse(trace([(3e-9, 0.0), (1e-8, 0.0), (2.6e-8, 0.0)]), sustain=3)
    # healthy synthetic shapes at 45-75: the spread holds above that while the correlation is ~0
    assert checks.check_regressor_collapse(trace([(0.070, 0.02), (0.070, 0.03), (0.086, 0.06)]), sustain=3) is None
    # healthy default config (600 iterations, period 30; iters 30 and 60): the spread widens
    # before the correlation appears
    assert checks.check_regressor_collapse(trace([(0.051, -0.021), (0.076, -0.005)]), sustain=2) is None
    # healthy default config at 200 iterations (period 10, iters 60-80): the spread holds while
    # the correlation is still ~0; it rose to 0.30 at 100
    assert checks.check_regressor_collapse(trace([(0.053, -0.018), (0.049, -0.003), (0.058, 0.063)]), sustain=3) is None
    # a dip and a recovery is not shrinking at every period
    assert checks.check_regressor_collapse(trace([(0.06, 0.0), (0.04, 0.0), (0.05, 0.0)]), sustain=3) is None


def test_learning_rate_checks():
    assert checks.check_learning_rate(1e-9, 1e-9, 2.0, 2.1, progress=0.3, past_warmup=True).name == "vanishing_lr"
    assert checks.check_learning_rate(1e-5, 1e-2, 2.0, 2.1, progress=0.99, past_warmup=True) is not None  # never learned
    assert checks.check_learning_rate(1e-5, 1e-2, 0.2, 2.1, progress=0.99, past_warmup=True) is None  # decayed after learning
    # the end of a cosine schedule after a normal detection run (loss 1.6 -> 0.9): planned, not an alarm
    assert checks.check_learning_rate(1e-6, 1e-3, 0.9, 1.6, progress=0.98, past_warmup=True) is None
    # the same lr in the first half of the run: decayed too early
    assert checks.check_learning_rate(1e-6, 1e-3, 0.9, 1.6, progress=0.3, past_warmup=True) is not None
    # a 50x box weight holds the weighted total near its start while roi_cls fell to 20%: learned
    assert checks.check_learning_rate(1e-7, 1e-3, 4.6, 5.0, progress=1.0, past_warmup=True,
                                      lowest_term_ratio=0.2) is None
    assert checks.check_learning_rate(1e-7, 1e-3, 4.6, 5.0, progress=1.0, past_warmup=True,
                                      lowest_term_ratio=0.95) is not None
    assert checks.check_lr_per_image(0.2, 2, "sgd").change[0] == "solver.lr: about 0.0025"
    assert checks.check_lr_per_image(0.02, 16, "sgd") is None


def test_gradient_checks():
    past = [1.0] * 50
    assert checks.check_gradients([1.1, 0.9], past, 0.0, 0) is None
    assert "spike 25" in checks.check_gradients([25.0], past, 0.0, 0).seen
    assert "90% of steps clipped" in checks.check_gradients([1.0], past, 0.9, 0).seen
    # clipping alone: the clip is the knob, named first; with a spike the lr comes first
    assert checks.check_gradients([1.0], past, 0.9, 0).change[0].startswith("solver.clip_grad_norm")
    assert checks.check_gradients([25.0], past, 0.9, 0).change[0].startswith("solver.lr")
    assert "2 non-finite" in checks.check_gradients([1.0], past, 0.0, 2).seen


def test_amp_loss_scale_falling():
    assert checks.check_loss_scale([65536.0, 32768.0, 16384.0, 8192.0]).name == "amp_loss_scale"
    assert checks.check_loss_scale([65536.0, 65536.0, 32768.0, 65536.0]) is None


def test_collapse_rules():
    assert check_collapse([3.0, 2.5, 2.8], 3.0, min_ratio=0.1, patience=3) is None
    below = check_collapse([3.0, 0.1, 0.0, 0.0], 3.0, min_ratio=0.1, patience=3)
    assert below and "below 0.1 x GT for 3 checks" in below.seen
    drop = check_collapse([5.0, 4.0, 0.4, 0.3, 0.35], 3.0, min_ratio=0.1, patience=3)
    assert drop and "down more than 90%" in drop.seen
    assert check_collapse([5.0, 4.0, 0.4], 3.0, min_ratio=0.1, patience=3) is None  # one low check is a swing
    assert any(c.startswith("model.roi.cls_pos_weight") for c in drop.change)
    assert check_collapse([0.0, 0.0, 0.0], 0.0, min_ratio=0.1, patience=3) is None  # no GT, no alarm
    # near-uniform early scores put every proposal above 0.05: falling from 100 to GT is learning
    assert check_collapse([100.0, 100.0, 62.0, 9.0, 4.5, 4.0], 4.0, min_ratio=0.1, patience=3) is None
    # the peak counts from the first check near GT on: a later fall from there is a collapse
    late = check_collapse([100.0, 6.0, 7.0, 0.5, 0.6, 0.5], 4.0, min_ratio=0.1, patience=3)
    assert late and "peak 7.00" in late.seen
    # a swing seen in a real digits run (93 -> 3.75 -> 58): not a collapse
    assert check_collapse([89.0, 0.12, 1.9, 11.5, 9.1, 92.9, 48.5, 3.75, 58.4], 4.4, min_ratio=0.1, patience=3) is None
    # a healthy default run (bf16, 1 thread): a burst after nothing fired, then confident at ~GT
    healthy = [1.375, 5.875, 65.75, 24.75, 21.375, 22.625, 10.125, 13.375, 10.75, 9.25, 9.875, 7.375, 6.875,
               6.625, 6.375, 5.375, 6.0, 5.625, 5.625]
    assert check_collapse(healthy, 3.38, min_ratio=0.1, patience=3) is None
    # the same fall to below GT is a collapse
    assert check_collapse(healthy[:-3] + [3.0, 2.5, 2.0], 3.38, min_ratio=0.1, patience=3).name == "collapse"


def test_weight_ratio():
    assert checks.check_weight_ratio({"loss_rpn_cls": 1, "loss_rpn_box": 1, "loss_roi_cls": 1, "loss_roi_box": 2}) is None
    alarm = checks.check_weight_ratio({"loss_rpn_cls": 1, "loss_rpn_box": 1, "loss_roi_cls": 0.5, "loss_roi_box": 7.5})
    assert alarm and "model.roi.box_loss.weight = 7.5 is 15x model.roi.cls_loss.weight = 0.5" in alarm.seen


def probe_check(low, mid, fg_mass=0.2, correct=0.3, spread=0.2):
    return ProbeResult(ThresholdCounts((0.05, 0.3, 0.5, 0.7), (low, mid, mid, 0.0), 3.0),
                       ClassDiagnosis(fg_mass=fg_mass, correct=correct, accuracy=correct, margin=0.05, spread=spread))


def test_class_diagnosis_spread_measures_whether_the_class_distribution_follows_the_object():
    from rcnn_trainer.monitor.probe import class_diagnosis
    labels = torch.tensor([1, 2, 3, 4])
    # the class prior for every box, whatever its foreground mass: nothing learned from the image
    prior = torch.tensor([0.1, 0.4, 0.3, 0.1, 0.1])
    same = torch.stack([prior, prior * 0.5 + torch.tensor([0.5, 0, 0, 0, 0]), prior, prior])
    d = class_diagnosis(same, labels)
    assert d.spread == pytest.approx(0.0, abs=1e-6) and d.fg_mass == pytest.approx((0.9 * 3 + 0.45) / 4)
    # each box its own class: as far from the mean (0.25 each) as 4 classes allow
    own = torch.cat([torch.zeros(4, 1), torch.eye(4)], dim=1)
    d = class_diagnosis(own, labels)
    assert d.spread == pytest.approx(0.75) and d.correct == pytest.approx(1.0) and d.accuracy == 1.0
    # confidently wrong but different per box (a head at chance that does look at the image)
    assert class_diagnosis(own, torch.tensor([2, 3, 4, 1])).spread == pytest.approx(0.75)
    assert math.isnan(class_diagnosis(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)).spread)


def test_low_confidence_background_wins():
    alarm = checks.check_low_confidence([probe_check(5.0, 0.0), probe_check(6.0, 0.1), probe_check(5.5, 0.0)], sustain=3)
    assert alarm.name == "low_confidence" and "score >= 0.5: 0.00, 0.10, 0.00" in alarm.seen
    assert "foreground probability 0.20" in alarm.seen and alarm.change[0].startswith("model.roi.cls_pos_weight")
    assert checks.check_low_confidence([probe_check(5.0, 0.0), probe_check(6.0, 1.0), probe_check(5.5, 0.0)],
                                       sustain=3) is None


def test_low_confidence_waits_while_the_rpn_still_feeds_more_positives():
    low = [probe_check(30.0, 0.0, fg_mass=m) for m in (0.42, 0.32, 0.29)]
    # RoI positives per image of a healthy digits run (judgments 30-105): the RPN is still
    # learning to propose the objects, the head's foreground follows later
    growing = [5.2, 6.1, 7.2, 10.9, 8.6, 12.6]
    assert checks.check_low_confidence(low, sustain=3, roi_positives=growing) is None
    # starved sampling: positives flat at what positive_fraction allows
    flat = [1.7, 1.8, 1.8, 1.8, 1.8, 1.8]
    assert checks.check_low_confidence(low, sustain=3, roi_positives=flat).name == "low_confidence"
    # too short a series to compare two windows: judged on the probe alone
    assert checks.check_low_confidence(low, sustain=3, roi_positives=growing[:4]).name == "low_confidence"
    assert checks.positives_growing([1.0, 1.0, 1.0, 1.2, 1.2, 1.2], 3, 1.2)
    assert not checks.positives_growing([1.0, 1.0, 1.0, 1.1, 1.1, 1.1], 3, 1.2)


def test_class_confusion_never_suggests_a_value_the_run_already_has():
    """The 10-class real-content run with the auto wide head (1024, 128) was told to raise
    representation_size to 1024 and fpn_channels to 128-256: each suggestion now names the
    run's value and a different one, or is left out."""
    confused = [probe_check(45.0, 0.0, fg_mass=0.8, correct=0.25)] * 3
    wide = checks.CapacityAdvice(representation_size=1024, fpn_channels=128, min_size=512, max_iters=900)
    change = checks.check_low_confidence(confused, sustain=3, advice=wide).change
    assert not any(c.startswith("model.roi.representation_size") for c in change)
    assert "model.backbone.fpn_channels: 128 -> 256" in change
    assert any(c.startswith("solver.max_iters: 900 -> 1800") for c in change)
    assert any(c.startswith("data.min_size: 512 -> 768") for c in change)
    widest = checks.CapacityAdvice(representation_size=1024, fpn_channels=256, min_size=800, max_iters=900)
    change = checks.check_low_confidence(confused, sustain=3, advice=widest).change
    assert not any(c.startswith(("model.roi.representation_size", "model.backbone.fpn_channels")) for c in change)
    for suggestion in change:  # every suggestion with a number names two different ones
        key, _, rest = suggestion.partition(": ")
        if "->" in rest:
            before, after = (part.split()[0] for part in rest.split("->")[:2])
            assert before != after, suggestion


def test_class_confusion_is_told_apart():
    confused = [probe_check(45.0, 0.0, fg_mass=0.8, correct=0.25)] * 3
    narrow = checks.CapacityAdvice(representation_size=256, fpn_channels=64, min_size=320, max_iters=300)
    alarm = checks.check_low_confidence(confused, sustain=3, advice=narrow)
    assert alarm.name == "class_confusion" and "only 25%, 25%, 25% of it to the true class" in alarm.seen
    assert alarm.change[0].startswith("model.roi.representation_size: 256 -> 1024")
    assert "model.backbone.fpn_channels: 64 -> 128" in alarm.change
    assert not any("cls_pos_weight: raise" in c for c in alarm.change)
    # with flip augmentation on, mirrored classes come first (digits, letters)
    with_flips = checks.check_low_confidence(confused, sustain=3, flips=True, advice=narrow)
    assert with_flips.change[0].startswith("data.hflip_prob: 0") and with_flips.change[1:] == alarm.change
    # the same low scores while the true class's share rises: a model still learning, no alarm
    learning = [probe_check(45.0, 0.0, fg_mass=0.8, correct=c) for c in (0.25, 0.35, 0.45)]
    assert checks.check_low_confidence(learning, sustain=3) is None
    rising_fg = [probe_check(5.0, 0.0, fg_mass=m) for m in (0.1, 0.2, 0.3)]
    assert checks.check_low_confidence(rising_fg, sustain=3) is None
    # the classes are judged once foreground was found at every check of the window: a slow
    # healthy run (digits, iterations 150-180) is at chance while foreground is still arriving;
    # shuffled labels (4 classes, iterations 105-135) stay at chance after it arrived
    arriving = [probe_check(22.0, 0.0, fg_mass=m, correct=c) for m, c in ((0.45, 0.25), (0.60, 0.24), (0.54, 0.26))]
    assert checks.check_low_confidence(arriving, sustain=3) is None
    shuffled = [probe_check(45.0, 0.0, fg_mass=m, correct=c) for m, c in ((0.66, 0.27), (0.76, 0.25), (0.78, 0.26))]
    assert checks.check_low_confidence(shuffled, sustain=3).name == "class_confusion"


def test_class_confusion_when_every_object_gets_the_same_class_distribution():
    """Shuffled labels (4 classes, judgments 60-90 of tools/pathology_suite.py): foreground
    still arriving, but the head gives every GT box the class prior. A slow healthy run at the
    same point (the same shapes with true labels, 45-75) is at chance too, but its class
    distribution follows the box."""
    series = ((0.174, 0.278, 0.039), (0.372, 0.252, 0.017), (0.459, 0.249, 0.032))
    shuffled = [probe_check(40.0, 0.0, fg_mass=m, correct=c, spread=s) for m, c, s in series]
    alarm = checks.check_low_confidence(shuffled, sustain=3)
    assert alarm.name == "class_confusion" and "same class distribution" in alarm.seen
    assert "0.039, 0.017, 0.032" in alarm.seen and alarm.change[0].startswith("data.train.ann_file")
    assert not any("cls_pos_weight: raise" in c for c in alarm.change)
    # without the spread, the same probe says: foreground still rising, wait
    assert checks.check_low_confidence([ProbeResult(h.counts, replace(h.classes, spread=0.2)) for h in shuffled], sustain=3) is None
    healthy = [probe_check(40.0, 0.0, fg_mass=m, correct=c, spread=s)
               for m, c, s in ((0.123, 0.295, 0.069), (0.147, 0.317, 0.067), (0.573, 0.308, 0.075))]
    assert checks.check_low_confidence(healthy, sustain=3) is None
    # an untrained head: the same uniform distribution for every box, foreground C/(C+1) fading
    # is not named "every object the same distribution" (the >= 0.5 foreground rule still judges it)
    untrained = [probe_check(100.0, 0.0, fg_mass=m, correct=0.25, spread=0.004) for m in (0.78, 0.74, 0.69)]
    assert "same class distribution" not in checks.check_low_confidence(untrained, sustain=3).seen
    # the class prior on boxes the head calls background: background wins, not confusion
    starved = [probe_check(5.0, 0.0, fg_mass=m, spread=0.01) for m in (0.02, 0.05, 0.03)]
    assert checks.check_low_confidence(starved, sustain=3).name == "low_confidence"
    # the true class's share rising: learning, whatever the spread
    rising = [probe_check(40.0, 0.0, fg_mass=m, correct=c, spread=0.03) for m, c in ((0.3, 0.25), (0.4, 0.3), (0.5, 0.35))]
    assert checks.check_low_confidence(rising, sustain=3) is None


def test_monitor_state_from_an_older_checkpoint_keeps_the_after_warmup_window():
    from rcnn_trainer.config_loader import load_config
    from rcnn_trainer.monitor.health import build_health_monitor

    monitor = build_health_monitor(load_config("config.yaml", ["model.num_classes=3"]))
    history = [period_record(loss=1.0 - 0.1 * i) for i in range(5)]
    # checkpoints written before the index existed kept the judgments after warmup as a copy
    monitor.load_state_dict({"history": history, "after_warmup": history[2:], "checks": 5})
    assert monitor.state.warmup_end == 2
    assert history[monitor.state.warmup_end:] == history[2:]
    assert "after_warmup" not in monitor.state_dict()


def mask_periods(ious, trivial=0.7, losses=(0.6916, 0.6915, 0.6914)):
    return [period(**{"roi/mask_iou": m, "roi/mask_trivial_iou": trivial, "loss_roi_mask": l,
                      "loss_roi_mask_weighted": l}) for m, l in zip(ious, losses)]


@pytest.mark.parametrize("ious, trivial, losses, fires", [
    ([0.53, 0.52, 0.52], 0.7, (0.6916, 0.6916, 0.6914), True),   # mask weight 0 (the pathology run)
    ([0.49, 0.53, 0.55], 0.7, (0.6916, 0.6916, 0.6914), True),   # its IoU noise rising by chance, the loss flat
    ([0.69, 0.70, 0.70], 0.7, (0.40, 0.40, 0.40), True),         # stuck at the full box
    ([0.68, 0.70, 0.77], 0.7, (0.51, 0.44, 0.35), False),        # healthy shapes, iterations 60-90: past them
    ([0.00, 0.00, 0.03], 0.39, (0.639, 0.603, 0.573), False),    # healthy glyphs: blank masks, the loss falling
    ([0.84, 0.88, 0.90], 0.7, (0.30, 0.25, 0.22), False),        # healthy: past them
    ([0.93, 0.94, 0.94], 0.99, (0.1, 0.1, 0.1), False),          # box-shaped segmentations: nothing more to learn
    ([0.40, float("nan"), 0.41], 0.7, (0.69, 0.69, 0.69), False),  # too few judgments with positives
])
def test_mask_not_learning(ious, trivial, losses, fires):
    alarm = checks.check_mask_not_learning(mask_periods(ious, trivial, losses), sustain=3)
    assert (alarm is not None) == fires
    if fires:
        assert alarm.name == "mask_not_learning" and "model.mask.loss.weight" in alarm.change[0]


def test_a_mask_term_that_levels_off_above_the_trivial_masks_is_not_flat():
    """Healthy glyphs: loss_roi_mask 0.449 -> 0.431 over iterations 195-255 (never half of its
    0.69 start: the BCE of soft targets has a high floor) while its masks beat the trivial ones."""
    def falling(i, mask_iou):
        others = {f"loss_{t}{w}": 0.4 * 0.8 ** i for t in ("rpn_cls", "rpn_box", "roi_cls", "roi_box")
                  for w in ("", "_weighted")}
        mask = 0.449 - 0.004 * i
        return period(**others, loss=4 * 0.4 * 0.8 ** i + mask, loss_roi_mask=mask, loss_roi_mask_weighted=mask,
                      **{"roi/mask_iou": mask_iou, "roi/mask_trivial_iou": 0.4})

    history = [falling(i, 0.6) for i in range(5)]
    first = period(**{"loss_roi_mask": 0.69, "loss_roi_mask_weighted": 0.69})
    assert checks.check_flat_term(history, window=5, first=first) is None
    stuck = [falling(i, 0.3) for i in range(5)]
    alarm = checks.check_flat_term(stuck, window=5, first=first)
    assert alarm is not None and "loss_roi_mask" in alarm.seen


def test_a_box_only_history_has_no_mask_term_and_no_mask_alarm():
    history = [period() for _ in range(4)]
    assert "loss_roi_mask" not in history[-1].terms and math.isnan(history[-1].mask_iou)
    assert checks.check_mask_not_learning(history, sustain=3) is None


def test_initial_mask_loss_is_expected_at_ln2_and_a_wrong_normalization_fires():
    record = {"images": 2, "rpn/pos_per_image": 10, "rpn/neg_per_image": 118, "avg_factor/rpn_cls": 256,
              "roi/pos_per_image": 16, "roi/neg_per_image": 48, "avg_factor/roi_cls": 128}
    expected = checks.expected_initial_losses({**record, "loss_roi_mask": 0.7}, num_classes=4,
                                              rpn_cls=ClsLoss("bce"), roi_cls=ClsLoss("ce"))
    assert expected["loss_roi_mask"] == pytest.approx(math.log(2))
    sums_over_one = {**record, "loss_rpn_cls": expected["loss_rpn_cls"], "loss_roi_cls": expected["loss_roi_cls"],
                     "loss_roi_mask": math.log(2) * 28 * 28 * 32}  # summed, divided by 1
    alarm = checks.check_initial_loss_scale(sums_over_one, expected)
    assert alarm is not None and "loss_roi_mask" in alarm.seen and "model.mask.loss.weight" in " ".join(alarm.change)


def test_class_confusion_waits_while_the_foreground_is_new_in_the_run():
    """healthy@digits, config.yaml, 600 iterations (20 judgments; after warmup from 60): the probe's
    foreground probability and true-class share per judgment. Its classes separated from 270 on
    (AP 0.513); before the wait `class_confusion` fired at 180, 210 and 240."""
    fg = [0.01, 0.18, 0.59, 0.66, 0.69, 0.82, 0.85, 0.87, 0.93, 0.97]
    correct = [0.121, 0.122, 0.131, 0.126, 0.141, 0.135, 0.151, 0.197, 0.285, 0.383]
    dets = [0.0, 0.0, 0.0, 0.0, 0.25, 0.0, 0.25, 0.12, 1.12, 2.0]
    probes = [probe_check(60.0, d, fg_mass=m, correct=c) for d, m, c in zip(dets, fg, correct)]
    fired = [60 + 30 * (n - 1) for n in range(3, len(probes) + 1)
             if checks.check_low_confidence(probes[:n], sustain=3, run_judgments=20) is not None]
    assert fired == []
    # without the run's length the window alone decides, as before: the three alarms come back
    fired = [60 + 30 * (n - 1) for n in range(3, len(probes) + 1)
             if checks.check_low_confidence(probes[:n], sustain=3) is not None]
    assert fired == [180, 210, 240]
    # the same flat share long after the foreground arrived is still confusion
    stuck = probes[:7] + [probe_check(60.0, 0.0, fg_mass=0.9, correct=0.14)] * 3
    alarm = checks.check_low_confidence(stuck, sustain=3, run_judgments=20)
    assert alarm is not None and alarm.name == "class_confusion"
