"""Training-health checks. Each takes plain numbers and returns an Alarm or None.

Numbers come from the per-period means of the training log (`history`: one PeriodMeans per
monitor period, oldest first) or from the probe-set inference. What each check compares against is its
group of `monitor.*` (config_monitor.py), with the measured reasons in docs/monitor.md.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from rcnn_trainer.config import CollapseConfig
from rcnn_trainer.config_monitor import (FlatLossLimits, GradientLimits, InitialLossLimits, LearningRateLimits,
                                         LossScaleLimits, LowConfidenceLimits, LrPerImageLimits, ProposalIouLimits,
                                         MaskLearningLimits, OverfittingLimits, RegressorCollapseLimits, StarvationLimits, StuckIouLimits, WeightRatioLimits)
from rcnn_trainer.losses.settings import ClsLoss
from rcnn_trainer.losses.weighting import LOSS_TERMS
from rcnn_trainer.model import stats as S
from rcnn_trainer.monitor.alarms import Alarm
from rcnn_trainer.monitor.period import PeriodMeans
from rcnn_trainer.monitor.probe import ProbeResult

WEIGHT_KEYS = {name: f"{term.config_key}.weight" for name, term in LOSS_TERMS.items()}
BOX_TYPE_KEYS = {"rpn": "model.rpn.box_loss.type", "roi": "model.roi.box_loss.type"}


# ------------------------------------------------------------------ 1. loss scale at start
def expected_initial_losses(record: dict, *, num_classes: int, rpn_cls: ClsLoss, roi_cls: ClsLoss) -> dict:
    """What each classification term should be at initialization (zero logits), given the
    sampled positives/negatives and avg_factors of this batch, with the heads' own settings."""
    images = record[S.IMAGES]

    def expected(pos, neg, factor, per_pos, per_neg):
        return (pos * images * per_pos + neg * images * per_neg) / max(factor, 1.0)

    ln2 = math.log(2.0)
    if rpn_cls.type == "focal":
        modulation = 0.5 ** rpn_cls.gamma  # (1 - p_t) ** gamma at p = 0.5
        pos_rpn, neg_rpn = rpn_cls.alpha * modulation * ln2, (1 - rpn_cls.alpha) * modulation * ln2
    else:
        pos_rpn, neg_rpn = ln2, ln2
    ln_c = math.log(num_classes + 1)
    focal = (1 - 1 / (num_classes + 1)) ** roi_cls.gamma if roi_cls.type == "focal" else 1.0
    expected_losses = {
        "loss_rpn_cls": expected(record[S.RPN_POS], record[S.RPN_NEG],
                                 record[S.RPN_CLS_FACTOR], pos_rpn * rpn_cls.pos_weight, neg_rpn),
        "loss_roi_cls": expected(record[S.ROI_POS], record[S.ROI_NEG],
                                 record[S.ROI_CLS_FACTOR], ln_c * focal * roi_cls.pos_weight, ln_c * focal),
    }
    if "loss_roi_mask" in record:  # per-pixel BCE at zero logits, whatever the targets
        expected_losses["loss_roi_mask"] = ln2
    return expected_losses


def check_initial_loss_scale(record: dict, expected: dict, limits: InitialLossLimits = InitialLossLimits(),
                             pretrained: bool = False) -> Alarm | None:
    """First iteration: classification terms far from their value at zero logits, or a box
    term far above its natural range (a per-box loss of order 1 averaged over the sample).
    `pretrained` (model.init_from): trained heads start far below those values, so only a term
    far above them counts."""
    off = {}  # term -> what was seen
    tolerance, box_limit = limits.tolerance, limits.box_limit
    for name, value in expected.items():
        seen = record.get(name, float("nan"))
        low = 0.0 if pretrained else value / tolerance
        if not (low <= seen <= value * tolerance):
            off[name] = f"{name} = {seen:.4g}, expected about {value:.4g} at initialization"
    for name in ("loss_rpn_box", "loss_roi_box"):
        if record.get(name, 0.0) > box_limit:
            off[name] = f"{name} = {record[name]:.4g}, expected below {box_limit:g} at initialization"
    if not off:
        return None
    return Alarm(
        name="initial_loss_scale",
        seen="; ".join(off.values()),
        why="a loss far from its initialization value usually means it is normalized by the wrong number "
            "(a sum divided by 1 instead of by the sampled or positive count) or weighted far off; "
            "training then behaves as with a wildly wrong learning rate",
        change=[f"{WEIGHT_KEYS[name]}: check the weight of the term named above" for name in off]
        + ["model.rpn.cls_loss.avg_factor / model.roi.cls_loss.avg_factor: sampled (the torchvision normalization)"])


# ------------------------------------------------------------------ 2. one term dominates
def check_weight_ratio(weights: dict[str, float], limits: WeightRatioLimits = WeightRatioLimits()) -> Alarm | None:
    """At start: one loss weight `limit` times or more the smallest non-zero one."""
    active = {n: w for n, w in weights.items() if w > 0}
    if len(active) < 2:
        return None
    top, low = max(active, key=active.get), min(active, key=active.get)
    if active[top] < limits.limit * active[low]:
        return None
    return Alarm(
        name="loss_weight_ratio",
        seen=f"{WEIGHT_KEYS[top]} = {active[top]:g} is {active[top] / active[low]:.0f}x {WEIGHT_KEYS[low]} = {active[low]:g}",
        why="a term weighted that much more than another usually ends up dominating the gradient and oscillating "
            "(the box weight 7.5 vs classification 0.5 case)",
        change=[f"{WEIGHT_KEYS[top]}: lower it toward 1.0", f"{WEIGHT_KEYS[low]}: raise it toward 1.0"])


def check_dominant_term(history: list[PeriodMeans], *, max_share: float, sustain: int) -> Alarm | None:
    """A weighted term above `max_share` of the total for the last `sustain` periods, whose
    weight is above every other term's: the balance the config's weights set, not the terms'
    own scales. At equal weights the RoI cross-entropy over many classes outweighs an IoU box
    loss by itself (26 letters, GIoU: roi_cls 71-77% at every period of a run whose AP rose
    0.085 -> 0.098 with it) and lowering its weight is not the remedy."""
    if len(history) < sustain:
        return None
    last = history[-1]
    weights = {n: last.weighted[n] / last.terms[n] for n in last.weighted if last.terms.get(n, 0.0) > 0}
    for name in last.weighted:
        key = WEIGHT_KEYS[name]
        others = [w for n, w in weights.items() if n != name]
        if name not in weights or not others or weights[name] <= max(others) * (1 + 1e-6):
            continue
        shares = [h.weighted.get(name, 0.0) / h.loss for h in history[-sustain:] if h.loss > 0]
        if len(shares) == sustain and min(shares) > max_share:
            return Alarm(
                name="dominant_loss",
                seen=f"{name} is {', '.join(f'{100 * s:.0f}%' for s in shares)} of the weighted total over the "
                     f"last {sustain} monitor periods (limit {100 * max_share:.0f}%)",
                why="one term drives almost all of the gradient: the others barely train, and a large box weight "
                    "makes the loss oscillate",
                change=[f"{key}: lower it (e.g. to 1.0) so no term dominates",
                        "monitor.dominant_share: raise it if this balance is intended"])
    return None


# ------------------------------------------------------------------ 3. a term that does not fall
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
    converging, not stuck (healthy digits: rpn_box rose to 0.031 at iteration 60, fell to 0.011
    and stayed there through the end of the cosine schedule). Judge it on periods after
    warmup: early on a box loss often waits for the classifier."""
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
    them at all with predicted deltas that follow their targets (`limits.box_follows`)."""
    if LOSS_TERMS[name].kind == "mask":
        return latest.mask_iou > latest.mask_trivial_iou
    if name == "loss_roi_box":
        refines = latest.roi_pred_iou - latest.proposal_iou
        return refines >= limits.box_refines or (refines > 0 and latest.delta_corr >= limits.box_follows)
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


# ------------------------------------------------------------------ 4. foreground starvation
def check_foreground_starvation(history: list[PeriodMeans], *, sustain: int,
                                limits: StarvationLimits = StarvationLimits()) -> Alarm | None:
    """RPN or RoI positives per image below `min_share` x the GT objects per image for `sustain`
    periods. The data gives at least that many: every GT box has a best anchor (matched even below
    fg_iou_thresh) and is itself added to the RoIs, so fewer means sampling or matching starves."""
    if len(history) < sustain:
        return None
    recent = history[-sustain:]
    gt = [h.gt_per_image for h in recent]
    if min(gt) <= 0:
        return None
    for head, pos in (("rpn", [h.rpn_pos for h in recent]), ("roi", [h.roi_pos for h in recent])):
        if all(p < limits.min_share * g for p, g in zip(pos, gt)):
            return Alarm(
                name="foreground_starvation",
                seen=f"{head} positives per image {', '.join(f'{p:.2f}' for p in pos)} with "
                     f"{', '.join(f'{g:.2f}' for g in gt)} GT objects per image",
                why="fewer foreground samples than objects: the classifier learns mostly background and the box "
                    "regressor gets little signal",
                change=[f"model.{head}.positive_fraction: raise it", f"model.{head}.fg_iou_thresh: lower it",
                        "model.anchors.sizes: auto (see the preflight's anchor coverage)"])
    return None


def check_proposal_iou_not_rising(history: list[PeriodMeans],
                                  limits: ProposalIouLimits = ProposalIouLimits()) -> Alarm | None:
    """Judged at every period from the `min_periods`-th on: the mean IoU of positive proposals
    over the last 3 periods never got above its first value and stays near the matching
    threshold (below `low`): the RPN is not improving. A level that settled higher is a
    converged RPN, not a stuck one (the default run settles at ~0.6 within 100 iterations)."""
    values = [h.proposal_iou for h in history]
    values = [v for v in values if not math.isnan(v)]
    if (len(values) < limits.min_periods or max(values[-3:]) > values[0] + limits.min_gain
            or max(values[-3:]) >= limits.low):
        return None
    return Alarm(
        name="proposal_iou_flat",
        seen=f"mean IoU of positive proposals {values[0]:.3f} at first, {', '.join(f'{v:.3f}' for v in values[-3:])} "
             f"over the last 3 of {len(values)} periods",
        why="the RPN's proposals are not getting closer to the objects, so the RoI head keeps seeing poor boxes",
        change=["model.rpn.box_loss.weight: raise it", "model.anchors.sizes: auto (fitted to the objects)",
                "solver.lr: check it is not too low"])


def check_low_confidence(history: list[ProbeResult], *, sustain: int, roi_positives: list[float] | None = None,
                         flips: bool = False, advice: CapacityAdvice | None = None,
                         limits: LowConfidenceLimits = LowConfidenceLimits()) -> Alarm | None:
    """Probe detections at the threshold nearest 0.5 below `min_ratio` x GT per image for
    `sustain` checks in a row, while the classifier makes no progress on the GT boxes over
    those checks (a model still learning is left alone), told apart by what it says there:
    - foreground probability (1 - p(background)) below `fg_mass_split` and not rising by
      `min_progress`: background wins (alarm `low_confidence`: positive weights and sampling).
      Not while the RoI head's positives per image (`roi_positives`, one per judgment since
      the start) still grow by `min_growth` x from one `sustain` window to the next: the RPN
      is still learning to propose the objects, so the balance the head learns from is still
      shifting (healthy digits: 11 -> 18 positives/image while foreground sat at 0.3 for 60
      iterations, then rose to 0.9; starved sampling stays flat at 1.8);
    - foreground found, but the true class's share of it not rising by `min_progress`:
      `class_confusion` (capacity, lr and iterations, class balance; flip augmentation when
      `flips`, since mirrored digits and letters are other classes or none). Judged once the
      foreground has been found at every one of the `sustain` checks: early in a slow healthy
      run the true class sits at chance while foreground is still rising, exactly as with
      shuffled labels; only the shuffled ones stay there;
    - foreground being found (mean over the window >= `found_mass`, not falling) and the head giving every
      GT box the same class distribution (mean `spread` over the window below `flat_spread`)
      with the true class's share not rising: `class_confusion` at once, labels first. It has
      learned the class prior and nothing from the image. Shuffled labels (synthetic shapes):
      spread 0.039, 0.017, 0.032 (mean 0.029) while foreground rose 0.17 -> 0.46 at 60-90 of
      300 iterations. Healthy runs, lowest window mean after warmup: shapes 0.104, letters
      0.121, handwriting 0.084 (the shapes at 45-75, true class at chance: 0.070): their class
      distributions follow the box."""
    if len(history) < sustain:
        return None
    lim = limits
    min_ratio, fg_mass_split, min_progress = lim.min_ratio, lim.fg_mass_split, lim.min_progress
    recent = history[-sustain:]
    if min(h.counts.gt_per_image for h in recent) <= 0:
        return None
    near_half = [h.counts.nearest(0.5) for h in recent]
    if any(dets >= min_ratio * h.counts.gt_per_image for h, (_, dets) in zip(recent, near_half)):
        return None
    lowest = recent[-1].counts.thresholds[0]
    dets = (f"probe detections/image with score >= {near_half[-1][0]:g}: "
            f"{', '.join(f'{d:.2f}' for _, d in near_half)} "
            f"(at >= {lowest:g}: {', '.join(f'{h.counts.at_lowest:.2f}' for h in recent)}) vs "
            f"{recent[-1].counts.gt_per_image:.2f} GT objects per image")
    mass = [h.classes.fg_mass for h in recent]
    correct = [h.classes.correct for h in recent]
    # NaN, not an error, for judgments restored from a checkpoint written before `spread` existed
    spread = [h.classes.spread for h in recent]
    # foreground found and not fading: an untrained head also gives every box the same
    # (uniform) distribution, with foreground C/(C+1) falling as it learns background
    if (not any(math.isnan(v) for v in mass + spread) and statistics.fmean(mass) >= lim.found_mass
            and mass[-1] >= mass[0] and statistics.fmean(spread) < lim.flat_spread
            and not correct[-1] > correct[0] + min_progress):
        return class_confusion(recent, dets, flips, same_for_every_object=True, advice=advice)
    if any(math.isnan(m) for m in mass) or mass[-1] < fg_mass_split:
        if not any(math.isnan(m) for m in mass) and mass[-1] > mass[0] + min_progress:
            return None  # foreground scores are rising: still learning
        if positives_growing(roi_positives or [], sustain, lim.min_growth):
            return None
        return Alarm(
            name="low_confidence",
            seen=f"{dets}; on the GT boxes themselves the head gives foreground probability "
                 f"{', '.join(f'{m:.2f}' for m in mass)}",
            why="background wins: even a perfectly placed box is scored as background, because background RoIs "
                "and anchors outweigh the foreground ones in the classification losses (too few positives sampled, "
                "or positives weighted too little)",
            change=["model.roi.cls_pos_weight: raise to 2-5", "model.rpn.cls_pos_weight: raise to 2-5",
                    "model.roi.positive_fraction: raise toward 0.25-0.5",
                    "model.rpn.positive_fraction: raise toward 0.5"])
    if min(mass) < fg_mass_split:
        return None  # foreground only just found: the classes separate after it (healthy digits: 0.45 -> 0.60 -> 0.54 at chance, then 0.79 and rising)
    if correct[-1] > correct[0] + min_progress:
        return None  # classes are separating: still learning
    return class_confusion(recent, dets, flips, same_for_every_object=False, advice=advice)


@dataclass(frozen=True)
class CapacityAdvice:
    """The resolved values class_confusion may suggest changing: a suggestion names the run's
    value and a different one, or is left out (a run with a 1024-wide head is not told to use 1024)."""
    representation_size: int
    fpn_channels: int
    min_size: int
    max_iters: int

    def changes(self) -> list[str]:
        out = []
        if self.representation_size < 1024:
            out.append(f"model.roi.representation_size: {self.representation_size} -> 1024 (torchvision's width)")
        if self.fpn_channels < 256:
            out.append(f"model.backbone.fpn_channels: {self.fpn_channels} -> {min(256, 2 * self.fpn_channels)}")
        out.append(f"solver.max_iters: {self.max_iters} -> {2 * self.max_iters} (or solver.lr higher if the loss "
                   f"falls slowly)")
        out.append(f"data.min_size: {self.min_size} -> {self.min_size * 3 // 2} if objects are small")
        return out


def class_confusion(recent: list[ProbeResult], dets: str, flips: bool, *, same_for_every_object: bool,
                    advice: CapacityAdvice | None = None) -> Alarm:
    """The `class_confusion` alarm. `same_for_every_object`: the head gives every GT box the
    same class distribution (spread ~0), i.e. it learned the class prior and nothing from the
    image; labels that carry no signal do exactly that, so checking them comes first."""
    mass = [h.classes.fg_mass for h in recent]
    correct = [h.classes.correct for h in recent]
    accuracy = [h.classes.accuracy for h in recent]
    spreads = [h.classes.spread for h in recent]
    seen = (f"{dets}; on the GT boxes the head gives foreground probability {', '.join(f'{m:.2f}' for m in mass)} "
            f"but only {', '.join(f'{100 * c:.0f}%' for c in correct)} of it to the true class (top-1 "
            f"{', '.join(f'{100 * a:.0f}%' for a in accuracy)}, margin to the second class "
            f"{recent[-1].classes.margin:.2f}")
    mirrored = ["data.hflip_prob: 0 if the classes are not left-right symmetric (digits, letters, arrows, "
                "left/right parts): flipped images teach mirrored shapes (real digits, 300 iterations: AP 0.10 "
                "with flips, 0.15 without)"] if flips else []
    look_at_labels = ("data.train.ann_file: look at a few training images with their labels to rule out wrong "
                      "category ids (rcnn-eval --visualize 8 data.val.ann_file=<the training file> "
                      "data.val.img_dir=<its images>)")
    capacity = advice.changes() if advice is not None else [
        "solver.max_iters: train longer (or solver.lr higher if the loss falls slowly)"]
    leave = "model.roi.cls_pos_weight: leave it; raising it does not separate classes"
    if same_for_every_object:
        return Alarm(
            name="class_confusion",
            seen=f"{seen}; every box gets the same class distribution: spread between boxes "
                 f"{', '.join(f'{s:.3f}' for s in spreads)})",
            why="foreground is found but the head gives every object the same class distribution: it has learned how "
                "often each class occurs and nothing about which class an object is. Labels that do not follow the "
                "images (a wrong or shuffled category mapping, categories merged from several files) do exactly "
                "this; a head without the capacity to see the difference comes second",
            change=[look_at_labels, *mirrored, *capacity,
                    "data.repeat_factor_threshold: 0.3 or higher if one class holds most training objects (the "
                    "prior is then that class for every box)", leave])
    return Alarm(
        name="class_confusion",
        seen=f"{seen})",
        why="foreground is found but the classes are confused: the foreground mass is spread over several classes, "
            "so no single class reaches a confident score. The box head lacks capacity or resolution for these "
            "classes, or needs more steps or a higher lr; rare classes stay confused longest. If the true class stays "
            "at chance for long, check the labels themselves: a shuffled category mapping looks exactly like this",
        change=[*mirrored, *capacity, look_at_labels, leave])


def positives_growing(positives: list[float], window: int, min_growth: float) -> bool:
    """The mean of the last `window` values at least `min_growth` x the mean of the `window`
    before them (False with fewer than 2 x window values, or none before)."""
    values = [v for v in positives if math.isfinite(v)]
    if len(values) < 2 * window:
        return False
    before = statistics.fmean(values[-2 * window:-window])
    return before > 0 and statistics.fmean(values[-window:]) >= min_growth * before


def check_regressor_collapse(history: list[PeriodMeans], *, sustain: int,
                             limits: RegressorCollapseLimits = RegressorCollapseLimits()) -> Alarm | None:
    """On the positive RoIs of training: the predicted deltas (of the true class) hardly vary
    (std below `max_std_ratio` x the target deltas' std) and do not follow the targets
    (correlation below `min_corr`) for `sustain` periods, while their spread is either below
    `small` at every one of them (the regressor barely moves any box) or shrinking at every
    period, by at least 1 - `shrink` over the window, and not widening by `widen` x over it
    (to `constant` at least: a spread of 1e-8 that doubles is still none): the regressor is
    heading to a constant.
    Measured, 300-iteration runs after warmup (iterations 60-90): box loss weight 0 (no signal)
    0.038, 0.031, 0.032 and 0.042, 0.033, 0.030 (weight decay pulls the outputs in); healthy
    regressors hold or widen their spread before the correlation appears: synthetic shapes
    0.070, 0.086, 0.099 (corr 0.14 at 90), the same at 200 iterations 0.053, 0.049, 0.058 (corr
    0.30 ten iterations later), letters and handwriting 0.15-0.29."""
    # judgments with nothing to compare (NaN: no positive whose targets vary) do not count
    pairs = [(h.delta_std_ratio, h.delta_corr) for h in history]
    pairs = [(r, c) for r, c in pairs if not (math.isnan(r) or math.isnan(c))]
    if len(pairs) < sustain:
        return None
    lim = limits
    ratio, corr = [r for r, _ in pairs[-sustain:]], [c for _, c in pairs[-sustain:]]
    if not all(r < lim.max_std_ratio and c < lim.min_corr for r, c in zip(ratio, corr)):
        return None
    shrinking = all(b <= a for a, b in zip(ratio, ratio[1:])) and ratio[-1] <= lim.shrink * ratio[0]
    if max(ratio) >= lim.small and not shrinking:
        return None  # still moving the boxes, and not pulled in: learning, the correlation comes next
    if ratio[-1] > max(lim.widen * ratio[0], lim.constant):
        return None  # small, but widening fast from its initialization: starting to learn
    return Alarm(
        name="regressor_collapse",
        seen=f"on positive RoIs, std of predicted / target box deltas {', '.join(f'{r:.3f}' for r in ratio)}, "
             f"correlation with the targets {', '.join(f'{c:.2f}' for c in corr)} over the last {sustain} periods",
        why="the box regressor's output no longer depends on the box it is asked about: it predicts a constant "
            "(often after a too-high lr or a box-loss spike)",
        change=["solver.lr: lower it (a too-high lr often ends here)", "solver.clip_grad_norm: set it (e.g. 10)",
                "model.roi.box_loss.weight: raise it if it is 0 or tiny (no signal reaches the regressor); "
                "lower it if it dominates"])


def check_mask_not_learning(history: list[PeriodMeans], *, sustain: int,
                            limits: MaskLearningLimits = MaskLearningLimits()) -> Alarm | None:
    """With masks on, after warmup: on the positive RoIs of training, the predicted masks score
    no better than a mask that ignores the RoI (the full box, or the batch's mean mask; a blank
    one scores 0), within `margin`, for `sustain` periods, and the mask loss does not fall by
    `min_fall` over them: the mask head learned nothing (a head that learns lowers its loss,
    even while it passes through blank masks; the IoU of an unlearned head is noise).
    Measured (300 iterations, judgments at 60, 75, 90): mask weight 0 on the shapes: IoU 0.53,
    0.52, 0.52 vs trivial 0.72, 0.69, 0.70, loss 0.6916 -> 0.6914; healthy shapes: IoU 0.68,
    0.70, 0.77 vs 0.70, 0.70, 0.69; healthy glyphs passed through blank masks (IoU 0.00, 0.00,
    0.03 vs 0.39) while the loss fell 0.639 -> 0.573, and beat the trivial masks from 120 on."""
    rows = [(h.mask_iou, h.mask_trivial_iou, h.terms.get("loss_roi_mask", math.nan)) for h in history]
    rows = [r for r in rows if not any(math.isnan(v) for v in r)][-sustain:]
    if len(rows) < sustain or any(m > t + limits.margin or t >= limits.box_like for m, t, _ in rows):
        return None
    first_loss, last_loss = rows[0][2], rows[-1][2]
    if last_loss < (1 - limits.min_fall) * first_loss:
        return None  # at or below the trivial masks, but its loss falls: still learning
    return Alarm(
        name="mask_not_learning",
        seen=f"on positive RoIs, predicted masks' IoU with their targets {', '.join(f'{m:.2f}' for m, _, _ in rows)} "
             f"vs {', '.join(f'{t:.2f}' for _, t, _ in rows)} for the best mask that ignores the RoI (full box or "
             f"mean mask), loss_roi_mask {first_loss:.4f} -> {last_loss:.4f}, over the last {sustain} periods",
        why="the mask head's output does not depend on the object: no signal reaches it (a mask weight of 0, a frozen "
            "or too small head) or its targets do not match the objects (segmentations of other objects)",
        change=["model.mask.loss.weight: raise it if it is 0 or tiny (1.0 is the Mask R-CNN weight)",
                "model.mask.num_convs / model.mask.conv_channels: a larger mask head",
                "the annotation file: check that each segmentation outlines its own box's object"])


# ------------------------------------------------------------------ overfitting (at evaluations)
def check_overfitting(evals: list[dict], limits: OverfittingLimits = OverfittingLimits()) -> Alarm | None:
    """`evals`: one {"iter", "val_loss", "train_loss", "AP"} per evaluation of the run. Fires when
    the val loss rose at each of the last `sustain` evaluations, to `min_rise` above its lowest,
    while the training loss fell and val AP rose by no more than `ap_drop` over them; or when val
    AP stayed `ap_drop` below its best for the last `sustain` evaluations. Both need evaluations
    during training (train.eval_period). Healthy digits (pathology suite, every 50 iterations):
    val loss 0.70 -> 0.85 -> 1.19 at 50-150 while AP rose 0.001 -> 0.055."""
    n = limits.sustain
    if len(evals) < n + 1:
        return None
    recent = evals[-(n + 1):]
    val, train = [e["val_loss"] for e in recent], [e["train_loss"] for e in recent]
    lowest = min(e["val_loss"] for e in evals)
    finite = all(math.isfinite(v) for v in val + train)
    # early in training the val loss rises with the training loss (more proposals become
    # positives, and the box terms count only those) while AP climbs: not overfitting
    ap_rose = recent[-1]["AP"] - recent[0]["AP"] > limits.ap_drop
    loss_rising = (finite and all(b > a for a, b in zip(val, val[1:])) and val[-1] >= (1 + limits.min_rise) * lowest
                   and train[-1] < train[0] and not ap_rose)
    best = max(evals, key=lambda e: e["AP"])
    ap_falling = best["AP"] > 0 and all(e["AP"] <= best["AP"] - limits.ap_drop for e in evals[-n:])
    if not (loss_rising or ap_falling):
        return None
    at = ", ".join(str(e["iter"]) for e in recent)
    seen = []
    if loss_rising:
        seen.append(f"val loss {' -> '.join(f'{v:.3f}' for v in val)} at iterations {at} (lowest {lowest:.3f}) while "
                    f"the training loss fell {train[0]:.3f} -> {train[-1]:.3f}")
    if ap_falling:
        aps = ", ".join(f"{e['AP']:.3f}" for e in evals[-n:])
        seen.append(f"val AP {aps} at the last {n} evaluations, below its best {best['AP']:.3f} at iteration "
                    f"{best['iter']}")
    return Alarm(
        name="overfitting",
        seen="; ".join(seen),
        why="the model fits the training images better while doing worse on images it does not train on: it "
            "memorizes the training set (too little data or augmentation for this many iterations)",
        change=["model_best.pth: the checkpoint of the best val AP so far (kept by every evaluation)",
                "solver.max_iters: stop about where val AP peaked",
                "data.hflip_prob (when the classes are mirror-safe) and data.min_size as a list (multi-scale): "
                "more augmentation",
                "solver.weight_decay: raise it (e.g. x10)",
                "data.train: more (or more varied) training images"])


# ------------------------------------------------------------------ 6. learning rate
def check_learning_rate(lr: float, base_lr: float, loss: float, initial_loss: float, *, progress: float,
                        past_warmup: bool, lowest_term_ratio: float | None = None,
                        limits: LearningRateLimits = LearningRateLimits()) -> Alarm | None:
    """lr negligible (under 1% of the base, or below 1e-6) while the model has not learned.
    A planned decay at the end of a schedule is not an alarm; it is one when the loss is still
    above `never_learned` x its value at the first step and no loss term has fallen below
    `learned_term` x its first judgment's mean (`lowest_term_ratio`: a heavily weighted term can
    hold the total up while the others learned), or when the lr is already negligible in the
    first half of the run (`progress` < 0.5) with the loss above `early_decay_loss` x it."""
    if not past_warmup or initial_loss <= 0:
        return None
    lim = limits
    negligible = lr < lim.negligible_share * base_lr or lr < lim.negligible_lr
    some_term_learned = lowest_term_ratio is not None and lowest_term_ratio < lim.learned_term
    stuck = loss > lim.never_learned * initial_loss and not some_term_learned
    too_early = progress < lim.early_progress and loss > lim.early_decay_loss * initial_loss
    if not (negligible and (stuck or too_early)):
        return None
    return Alarm(
        name="vanishing_lr",
        seen=f"lr {lr:.2e} (base {base_lr:.2e}) at {100 * progress:.0f}% of the run while the loss is {loss:.3f}, "
             f"{100 * loss / initial_loss:.0f}% of its first-step {initial_loss:.3f}",
        why="the weights barely move any more but the model has not learned: the schedule decayed too early "
            "or the base lr is far too small",
        change=["solver.lr: raise it (0.02 per 16 images for SGD, ~1e-3 for AdamW)",
                "solver.steps / solver.max_iters: decay later", "solver.schedule: cosine or multistep"])


def check_lr_per_image(lr: float, batch_size: int, optimizer: str,
                       limits: LrPerImageLimits = LrPerImageLimits()) -> Alarm | None:
    """SGD lr per image far above the reference 0.02 / 16."""
    reference = 0.02 / 16
    if optimizer != "sgd" or lr / batch_size <= limits.limit * reference:
        return None
    return Alarm(
        name="lr_too_high_for_batch",
        seen=f"solver.lr {lr:g} for {batch_size} images per step = {lr / batch_size / reference:.1f}x the "
             f"reference 0.02 per 16 images",
        why="Faster R-CNN with SGD usually diverges far above the linear-scaling reference",
        change=[f"solver.lr: about {reference * batch_size:.4g}", "solver.warmup_iters: longer",
                "solver.clip_grad_norm: 10"])


# ------------------------------------------------------------------ 7. gradients and AMP
def check_gradients(window_norms: list[float], past_norms: list[float], clipped_share: float,
                    nonfinite_steps: int, limits: GradientLimits = GradientLimits()) -> Alarm | None:
    """Gradient-norm spikes over the running median, frequent clipping, non-finite steps."""
    seen = []
    finite = [n for n in past_norms if math.isfinite(n)]
    window_finite = [n for n in window_norms if math.isfinite(n)]
    spike = limits.spike
    if len(finite) >= limits.min_history and window_finite:
        median = statistics.median(finite)
        peak = max(window_finite)
        if median > 0 and peak > spike * median:
            seen.append(f"grad norm spike {peak:.3g} = {peak / median:.0f}x the running median {median:.3g}")
    if clipped_share > limits.max_clipped:
        seen.append(f"{100 * clipped_share:.0f}% of steps clipped")
    if nonfinite_steps:
        seen.append(f"{nonfinite_steps} non-finite steps skipped this period")
    if not seen:
        return None
    return Alarm(
        name="gradients",
        seen="; ".join(seen),
        why="unstable gradients precede divergence; constant clipping means the effective lr is set by the clip",
        change=["solver.lr: lower it", "solver.clip_grad_norm: set it (e.g. 10), or raise it if nearly every step clips",
                "solver.warmup_iters: longer"])


def check_loss_scale(scales: list[float], limits: LossScaleLimits = LossScaleLimits()) -> Alarm | None:
    """AMP loss scale lower at each of the last `limits.falls` periods."""
    falls = limits.falls
    if len(scales) <= falls or not all(b < a for a, b in zip(scales[-falls - 1:], scales[-falls:])):
        return None
    return Alarm(
        name="amp_loss_scale",
        seen="AMP loss scale " + " -> ".join(f"{s:g}" for s in scales[-falls - 1:]),
        why="the scaler keeps finding inf/NaN gradients in fp16: values overflow",
        change=["solver.amp: false to confirm", "solver.clip_grad_norm: set it", "solver.lr: lower it"])


def check_collapse(history: list[float], gt_per_image: float, *, min_ratio: float, patience: int,
                   drop: float = CollapseConfig().drop, settle_ratio: float = CollapseConfig().settle_ratio
                   ) -> Alarm | None:
    """Detections per image at the lowest score threshold, one value per probe check.

    Fires when the last `patience` values are all below `min_ratio` * GT per image, or all more
    than `drop` (90%) below the peak before them. The peak counts only from the first check at
    which detections came down to at most `settle_ratio` (2) x GT: early on, near-uniform scores
    put every proposal above the lowest threshold, and falling from there is learning, not collapse.
    A fall counts only to below GT per image: a detector still finding as many boxes as there are
    objects is getting confident, not predicting background (a healthy default run fell from a
    burst of 65.8 at iteration 90 to 5.4-6.4 with 3.4 GT, at 3.5 per image above 0.5).
    """
    if gt_per_image <= 0 or not history:
        return None
    floor = min_ratio * gt_per_image
    recent = history[-patience:]
    below = len(recent) == patience and all(v < floor for v in recent)
    settled = next((i for i, v in enumerate(history) if v <= settle_ratio * gt_per_image), None)
    before_recent = history[settled:-patience] if settled is not None else []
    peak = max(before_recent) if before_recent else 0.0
    # the fall must last `patience` checks: early counts swing widely from one check to the next
    dropped = peak >= floor and len(recent) == patience and all(v < min((1 - drop) * peak, gt_per_image)
                                                                for v in recent)
    if not (below or dropped):
        return None
    trend = " -> ".join(f"{v:.2f}" for v in history[-8:])
    reason = (f"below {min_ratio:g} x GT for {patience} checks in a row" if below
              else f"down more than {100 * drop:.0f}% from its peak {peak:.2f}")
    return Alarm(
        name="collapse",
        seen=f"detections/image at the lowest threshold: {trend} ({reason}); GT objects/image {gt_per_image:.2f}",
        why="the detector is predicting background everywhere: background RoIs/anchors swamp the "
            "foreground ones, or the lr is too high (diverged) or too low (never learned), or no anchor fits the objects",
        change=["model.roi.cls_pos_weight: raise to 2-5 (foreground RoIs weigh more than background)",
                "model.rpn.cls_pos_weight: raise to 2-5 (foreground anchors weigh more)",
                "model.roi.positive_fraction: raise toward 0.5 (more positives sampled)",
                "model.roi.cls_loss.type: focal (down-weights easy background)",
                "solver.lr: lower it 2-10x if losses jumped, raise it if they never fell",
                "model.anchors.sizes: auto (see the preflight's anchor coverage)"])
