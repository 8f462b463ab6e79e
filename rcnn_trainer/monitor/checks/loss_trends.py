"""Terms that do not fall: flat_loss, stuck_iou_loss.

Each check takes plain numbers and returns an Alarm or None; its thresholds are a `monitor.*` group
(config_monitor.py), their measured reasons in docs/monitor.md.
"""

from __future__ import annotations

from rcnn_trainer.config_monitor import (FlatLossLimits, StuckIouLimits)
from rcnn_trainer.losses.weighting import LOSS_TERMS
from rcnn_trainer.monitor.alarms import Alarm
from rcnn_trainer.monitor.period import PeriodMeans

from rcnn_trainer.monitor.checks.keys import BOX_TYPE_KEYS, WEIGHT_KEYS


def relative_slope(values: list[float]) -> float:
    """Least-squares slope over the series, times its length, divided by its mean: the
    fractional change the trend predicts across the window (negative = falling)."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return (num / den) * n / mean_y if den and mean_y else 0.0


def check_flat_term(history: list[PeriodMeans], *, window: int, first: PeriodMeans | None = None,
                    limits: FlatLossLimits = FlatLossLimits()) -> Alarm | None:
    """A term whose trend over `window` periods changes it by less than `flat` (its first and
    last values too) while the weighted total of the other terms falls by more than `falling`,
    and which has not already fallen below half of its highest judgment (`first`, the run's
    first judgment, or any in `history`): a term that learned and then levels off is
    converging, not stuck. Judge it on periods after warmup: early on a box loss often waits
    for the classifier."""
    if len(history) < window:
        return None
    first = first if first is not None else history[0]
    recent = history[-window:]
    flat, falling = limits.flat, limits.falling
    for name in recent[-1].terms:
        series = [h.terms.get(name, 0.0) for h in recent]
        if min(series) <= 1e-6:
            continue
        highest = max([first.terms.get(name, 0.0)] + [h.terms.get(name, 0.0) for h in history])
        learned = series[-1] < limits.learned * highest or output_shows_learning(name, recent[-1], limits)
        level = abs(series[-1] / series[0] - 1.0) < flat
        others = [h.loss - h.weighted.get(name, 0.0) for h in recent]
        if (abs(relative_slope(series)) < flat and level and not learned and min(others) > 0
                and relative_slope(others) < -falling):
            head = LOSS_TERMS[name].head
            return Alarm(
                name="flat_loss", subject=name,
                seen=f"{name} stays at {series[0]:.4f} -> {series[-1]:.4f} over {window} periods "
                     f"(trend {100 * relative_slope(series):+.0f}%) while the other terms fall "
                     f"{100 * relative_slope(others):+.0f}%",
                why="this head is not learning: its gradient is too small (weight), its targets cannot be "
                    "reached (anchors), or its loss gives no gradient (IoU losses on disjoint boxes)",
                change=[f"{WEIGHT_KEYS[name]}: raise it"]
                + ([f"{BOX_TYPE_KEYS[head]}: smooth_l1 or ciou if it is giou", "model.anchors.sizes: match the object sizes"]
                   if head in BOX_TYPE_KEYS else ["model.mask.num_convs / model.mask.conv_channels: a larger mask head"]))
    return None


def output_shows_learning(name: str, latest: PeriodMeans, limits: FlatLossLimits) -> bool:
    """For terms whose value can level off high in a healthy run, what their head produces:
    the mask BCE (soft targets give it a high floor) once its masks beat RoI-blind ones; the
    RoI box term once the refined boxes beat their proposals by `limits.box_refines` IoU, or beat
    them at all with predicted deltas that follow their targets (`limits.box_follows`); a later
    cascade stage's box term once its boxes beat the previous stage's."""
    if LOSS_TERMS[name].kind == "mask":
        return latest.mask_iou > latest.mask_trivial_iou
    if name == "loss_roi_box":
        refines = latest.roi_pred_iou - latest.proposal_iou
        return refines >= limits.box_refines or (refines > 0 and latest.delta_corr >= limits.box_follows)
    if name.startswith("loss_roi_box_s"):  # a later cascade stage: its boxes beat the stage before's
        stage = int(name[len("loss_roi_box_s"):])  # (when they do not, cascade_stage_not_improving says so)
        ious = latest.stage_ious
        return len(ious) >= stage and ious[stage - 1] > ious[stage - 2]
    return False


def check_stuck_iou_loss(history: list[PeriodMeans], box_types: dict, *, sustain: int,
                         limits: StuckIouLimits = StuckIouLimits()) -> Alarm | None:
    """An IoU-type box loss (giou, diou, ciou, wiou) whose positive boxes keep missing their
    targets: mean IoU of the refined positive boxes with their GT below `limits.min_iou`."""
    if len(history) < sustain:
        return None
    pred_iou = {"rpn": lambda h: h.rpn_pred_iou, "roi": lambda h: h.roi_pred_iou}
    for head, loss_type in box_types.items():
        if loss_type not in ("giou", "diou", "ciou", "wiou"):
            continue
        values = [pred_iou[head](h) for h in history[-sustain:]]
        if all(v < limits.min_iou for v in values):
            return Alarm(
                name="stuck_iou_loss",
                seen=f"{head} {loss_type}: mean IoU of the refined positive boxes with their GT "
                     f"{', '.join(f'{v:.3f}' for v in values)} (below monitor.stuck_iou.min_iou={limits.min_iou:g} for {sustain} periods)",
                why="the predicted boxes hardly overlap their targets (tiny predicted boxes on tiny objects); an IoU "
                    "loss gives almost no gradient there",
                change=[f"{BOX_TYPE_KEYS[head]}: smooth_l1 (deltas) or ciou/diou (centre-distance term)",
                        "model.anchors.sizes: auto, or smaller anchors for small objects"])
    return None


