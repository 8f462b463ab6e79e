"""Training-health checks. Each takes plain numbers and returns an Alarm or None.

Numbers come from the per-period means of the training log (`history`: one dict per monitor
period, oldest first) or from the probe-set inference. Thresholds are arguments so tests
can provoke each check and the healthy default run can show that none fires.
"""

from __future__ import annotations

import math
import statistics

from rcnn_trainer.monitor.alarms import Alarm

WEIGHT_KEYS = {
    "loss_rpn_cls": "model.rpn.cls_loss.weight",
    "loss_rpn_box": "model.rpn.box_loss.weight",
    "loss_roi_cls": "model.roi.cls_loss.weight",
    "loss_roi_box": "model.roi.box_loss.weight",
}
BOX_TYPE_KEYS = {"rpn": "model.rpn.box_loss.type", "roi": "model.roi.box_loss.type"}


# ------------------------------------------------------------------ 1. loss scale at start
def expected_initial_losses(record: dict, *, num_classes: int, rpn_cls: dict, roi_cls: dict) -> dict:
    """What each classification term should be at initialization (zero logits), given the
    sampled positives/negatives and avg_factors of this batch. rpn_cls/roi_cls: loss_type,
    pos_weight, alpha, gamma."""
    images = record["images"]

    def expected(pos, neg, factor, per_pos, per_neg):
        return (pos * images * per_pos + neg * images * per_neg) / max(factor, 1.0)

    ln2 = math.log(2.0)
    if rpn_cls["loss_type"] == "focal":
        pos_rpn, neg_rpn = rpn_cls["alpha"] * 0.25 * ln2, (1 - rpn_cls["alpha"]) * 0.25 * ln2
    else:
        pos_rpn, neg_rpn = ln2, ln2
    ln_c = math.log(num_classes + 1)
    focal = (1 - 1 / (num_classes + 1)) ** roi_cls["gamma"] if roi_cls["loss_type"] == "focal" else 1.0
    return {
        "loss_rpn_cls": expected(record["rpn/pos_per_image"], record["rpn/neg_per_image"],
                                 record["avg_factor/rpn_cls"], pos_rpn * rpn_cls["pos_weight"], neg_rpn),
        "loss_roi_cls": expected(record["roi/pos_per_image"], record["roi/neg_per_image"],
                                 record["avg_factor/roi_cls"], ln_c * focal * roi_cls["pos_weight"], ln_c * focal),
    }


def check_initial_loss_scale(record: dict, expected: dict, *, box_limit: float = 5.0,
                             tolerance: float = 3.0) -> Alarm | None:
    """First iteration: classification terms far from their value at zero logits, or a box
    term far above its natural range (a per-box loss of order 1 averaged over the sample)."""
    off = {}  # term -> what was seen
    for name, value in expected.items():
        seen = record.get(name, float("nan"))
        if not (value / tolerance <= seen <= value * tolerance):
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
def check_weight_ratio(weights: dict[str, float], *, limit: float = 10.0) -> Alarm | None:
    """At start: one loss weight `limit` times or more the smallest non-zero one."""
    active = {n: w for n, w in weights.items() if w > 0}
    if len(active) < 2:
        return None
    top, low = max(active, key=active.get), min(active, key=active.get)
    if active[top] < limit * active[low]:
        return None
    return Alarm(
        name="loss_weight_ratio",
        seen=f"{WEIGHT_KEYS[top]} = {active[top]:g} is {active[top] / active[low]:.0f}x {WEIGHT_KEYS[low]} = {active[low]:g}",
        why="a term weighted that much more than another usually ends up dominating the gradient and oscillating "
            "(the box weight 7.5 vs classification 0.5 case)",
        change=[f"{WEIGHT_KEYS[top]}: lower it toward 1.0", f"{WEIGHT_KEYS[low]}: raise it toward 1.0"])


def check_dominant_term(history: list[dict], *, max_share: float, sustain: int) -> Alarm | None:
    """A weighted term above `max_share` of the total for the last `sustain` periods."""
    if len(history) < sustain:
        return None
    for name, key in WEIGHT_KEYS.items():
        shares = [h.get(f"{name}_weighted", 0.0) / h["loss"] for h in history[-sustain:] if h.get("loss", 0) > 0]
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


def check_flat_term(history: list[dict], *, window: int, flat: float = 0.05, falling: float = 0.2) -> Alarm | None:
    """A term whose trend over `window` periods changes it by less than `flat` while the
    weighted total of the other terms falls by more than `falling`."""
    if len(history) < window:
        return None
    recent = history[-window:]
    for name in WEIGHT_KEYS:
        series = [h.get(name, 0.0) for h in recent]
        if min(series) <= 1e-6:
            continue
        others = [h["loss"] - h.get(f"{name}_weighted", 0.0) for h in recent]
        if abs(relative_slope(series)) < flat and min(others) > 0 and relative_slope(others) < -falling:
            head = name.split("_")[1]
            return Alarm(
                name="flat_loss",
                seen=f"{name} stays at {series[0]:.4f} -> {series[-1]:.4f} over {window} periods "
                     f"(trend {100 * relative_slope(series):+.0f}%) while the other terms fall "
                     f"{100 * relative_slope(others):+.0f}%",
                why="this head is not learning: its gradient is too small (weight), its targets cannot be "
                    "reached (anchors), or its loss gives no gradient (IoU losses on disjoint boxes)",
                change=[f"{WEIGHT_KEYS[name]}: raise it", f"{BOX_TYPE_KEYS[head]}: smooth_l1 or ciou if it is giou",
                        "model.anchors.sizes: match the object sizes"])
    return None


def check_stuck_iou_loss(history: list[dict], box_types: dict, *, sustain: int, limit: float = 0.95) -> Alarm | None:
    """An IoU-type box loss whose per-positive value stays above `limit` (~no overlap)."""
    if len(history) < sustain:
        return None
    for head, loss_type in box_types.items():
        if loss_type not in ("giou", "diou", "ciou"):
            continue
        values = [h.get(f"{head}/box_loss_per_pos", float("nan")) for h in history[-sustain:]]
        if all(v > limit for v in values):
            return Alarm(
                name="stuck_iou_loss",
                seen=f"{head} {loss_type} loss per positive box: {', '.join(f'{v:.3f}' for v in values)} "
                     f"(above {limit} for {sustain} periods)",
                why="an IoU loss near 1 means the predicted boxes hardly overlap their targets (tiny predicted "
                    "boxes on tiny objects); GIoU's gradient is weak there",
                change=[f"{BOX_TYPE_KEYS[head]}: smooth_l1 (deltas) or ciou/diou (centre-distance term)",
                        "model.anchors.sizes: smaller anchors for small objects"])
    return None


# ------------------------------------------------------------------ 4. foreground starvation
def check_foreground_starvation(history: list[dict], *, sustain: int, min_pos: float = 0.5,
                                min_fraction: float = 0.01) -> Alarm | None:
    """RPN or RoI positives per image near zero, or under 1% of the sample, while GT exists."""
    if len(history) < sustain:
        return None
    recent = history[-sustain:]
    if min(h.get("gt_per_image", 0.0) for h in recent) <= 0:
        return None
    for head, keys in (("rpn", ("model.rpn.fg_iou_thresh", "model.rpn.positive_fraction")),
                       ("roi", ("model.roi.fg_iou_thresh", "model.roi.positive_fraction"))):
        pos = [h.get(f"{head}/pos_per_image", 0.0) for h in recent]
        neg = [h.get(f"{head}/neg_per_image", 0.0) for h in recent]
        frac = [p / (p + n) if p + n else 0.0 for p, n in zip(pos, neg)]
        if max(pos) < min_pos or max(frac) < min_fraction:
            return Alarm(
                name="foreground_starvation",
                seen=f"{head} positives per image {', '.join(f'{p:.2f}' for p in pos)} "
                     f"({', '.join(f'{100 * f:.1f}%' for f in frac)} of the sample) with "
                     f"{recent[-1]['gt_per_image']:.1f} GT objects per image",
                why="almost no sampled box is foreground, so the classifier learns only background and the "
                    "box regressor gets no signal",
                change=[f"{keys[0]}: lower it", f"{keys[1]}: raise it",
                        "model.anchors.sizes: match the object sizes (see the preflight's anchor coverage)"])
    return None


def check_proposal_iou_not_rising(history: list[dict], *, min_periods: int = 6, min_gain: float = 0.0) -> Alarm | None:
    """Mean IoU of positive proposals no higher after `min_periods` periods than at first."""
    values = [h.get("roi/pos_proposal_iou", float("nan")) for h in history]
    values = [v for v in values if not math.isnan(v)]
    if len(values) < min_periods or len(history) != min_periods:  # judged once, at that period
        return None
    if values[-1] > values[0] + min_gain:
        return None
    return Alarm(
        name="proposal_iou_flat",
        seen=f"mean IoU of positive proposals {values[0]:.3f} -> {values[-1]:.3f} over {len(values)} periods",
        why="the RPN's proposals are not getting closer to the objects, so the RoI head keeps seeing poor boxes",
        change=["model.rpn.box_loss.weight: raise it", "model.anchors.sizes: match the object sizes",
                "solver.lr: check it is not too low"])


def check_low_confidence(history: list[dict], *, sustain: int, min_ratio: float = 0.1) -> Alarm | None:
    """Probe detections at the threshold nearest 0.5 below `min_ratio` x GT per image for
    `sustain` checks in a row: objects are found (or not) but never scored confidently."""
    if len(history) < sustain:
        return None
    recent = history[-sustain:]
    keys = [k for k in recent[-1] if k.startswith("dets@")]
    if not keys or min(h["gt_per_image"] for h in recent) <= 0:
        return None
    key = min(keys, key=lambda k: abs(float(k[5:]) - 0.5))
    if any(h[key] >= min_ratio * h["gt_per_image"] for h in recent):
        return None
    lowest = keys[0]
    return Alarm(
        name="low_confidence",
        seen=f"probe detections/image with score >= {key[5:]}: {', '.join(f'{h[key]:.2f}' for h in recent)} "
             f"(at >= {lowest[5:]}: {', '.join(f'{h[lowest]:.2f}' for h in recent)}) vs "
             f"{recent[-1]['gt_per_image']:.2f} GT objects per image",
        why="the classifier keeps foreground scores low: background RoIs and anchors outweigh the foreground "
            "ones in the classification losses (too few positives sampled, or positives weighted too little)",
        change=["model.roi.cls_pos_weight: raise to 2-5", "model.rpn.cls_pos_weight: raise to 2-5",
                "model.roi.positive_fraction: raise toward 0.25-0.5", "model.rpn.positive_fraction: raise toward 0.5"])


# ------------------------------------------------------------------ 5. regressor collapse
def check_regressor_collapse(pred_spread: dict, gt_spread: dict, num_predictions: int, *,
                             min_ratio: float = 0.1, min_predictions: int = 5) -> Alarm | None:
    """Std of predicted box centres and sizes on the probe set vs the ground truth's."""
    if num_predictions < min_predictions:
        return None
    ratios = {k: pred_spread[k] / gt_spread[k] for k in pred_spread if gt_spread.get(k, 0) > 1e-6}
    if not ratios or max(ratios.values()) >= min_ratio:
        return None
    return Alarm(
        name="regressor_collapse",
        seen="std of predicted / GT box " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
             + f" over {num_predictions} probe detections",
        why="the predicted boxes no longer depend on the image: the box regressor outputs a constant",
        change=["solver.lr: lower it (a too-high lr often ends here)", "solver.clip_grad_norm: set it (e.g. 10)",
                "model.roi.box_loss.weight: lower it if it dominates"])


# ------------------------------------------------------------------ 6. learning rate
def check_learning_rate(lr: float, base_lr: float, loss: float, initial_loss: float, *,
                        past_warmup: bool, high_loss_share: float = 0.5) -> Alarm | None:
    """lr negligible (under 1% of the base, or below 1e-6) while the loss is still high."""
    if not past_warmup or initial_loss <= 0:
        return None
    negligible = lr < 0.01 * base_lr or lr < 1e-6
    if not (negligible and loss > high_loss_share * initial_loss):
        return None
    return Alarm(
        name="vanishing_lr",
        seen=f"lr {lr:.2e} (base {base_lr:.2e}) while the loss is {loss:.3f}, "
             f"{100 * loss / initial_loss:.0f}% of its starting {initial_loss:.3f}",
        why="the weights barely move any more but the model has not learned: the schedule decayed too early "
            "or the base lr is far too small",
        change=["solver.lr: raise it (0.02 per 16 images for SGD, ~1e-3 for AdamW)",
                "solver.steps / solver.max_iters: decay later", "solver.schedule: cosine or multistep"])


def check_lr_per_image(lr: float, batch_size: int, optimizer: str, *, limit: float = 4.0) -> Alarm | None:
    """SGD lr per image far above the reference 0.02 / 16."""
    reference = 0.02 / 16
    if optimizer != "sgd" or lr / batch_size <= limit * reference:
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
                    nonfinite_steps: int, *, spike: float = 10.0, max_clipped: float = 0.5) -> Alarm | None:
    """Gradient-norm spikes over the running median, frequent clipping, non-finite steps."""
    seen = []
    finite = [n for n in past_norms if math.isfinite(n)]
    window_finite = [n for n in window_norms if math.isfinite(n)]
    if len(finite) >= 10 and window_finite:
        median = statistics.median(finite)
        peak = max(window_finite)
        if median > 0 and peak > spike * median:
            seen.append(f"grad norm spike {peak:.3g} = {peak / median:.0f}x the running median {median:.3g}")
    if clipped_share > max_clipped:
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


def check_loss_scale(scales: list[float], *, falls: int = 3) -> Alarm | None:
    """AMP loss scale lower at each of the last `falls` periods."""
    if len(scales) <= falls or not all(b < a for a, b in zip(scales[-falls - 1:], scales[-falls:])):
        return None
    return Alarm(
        name="amp_loss_scale",
        seen="AMP loss scale " + " -> ".join(f"{s:g}" for s in scales[-falls - 1:]),
        why="the scaler keeps finding inf/NaN gradients in fp16: values overflow",
        change=["solver.amp: false to confirm", "solver.clip_grad_norm: set it", "solver.lr: lower it"])


def check_collapse(history: list[float], gt_per_image: float, *, min_ratio: float, patience: int) -> Alarm | None:
    """Detections per image at the lowest score threshold, one value per probe check.

    Fires when the last `patience` values are all below `min_ratio` * GT per image, or when
    the latest value fell more than 90% from the peak, while ground truth is not zero.
    """
    if gt_per_image <= 0 or not history:
        return None
    floor = min_ratio * gt_per_image
    recent = history[-patience:]
    peak = max(history)
    below = len(recent) == patience and all(v < floor for v in recent)
    dropped = peak > 0 and history[-1] < 0.1 * peak and peak >= floor
    if not (below or dropped):
        return None
    trend = " -> ".join(f"{v:.2f}" for v in history[-8:])
    reason = (f"below {min_ratio:g} x GT for {patience} checks in a row" if below
              else f"down more than 90% from its peak {peak:.2f}")
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
                "model.anchors.sizes: match the object sizes (see the preflight's anchor coverage)"])
