"""Loss scale at the start and between terms: initial_loss_scale, loss_weight_ratio, dominant_loss.

Each check takes plain numbers and returns an Alarm or None; its thresholds are a `monitor.*` group
(config_monitor.py), their measured reasons in docs/monitor.md.
"""

from __future__ import annotations

import math

from rcnn_trainer.config_monitor import (InitialLossLimits, WeightRatioLimits)
from rcnn_trainer.losses.settings import ClsLoss
from rcnn_trainer.model import stats as S
from rcnn_trainer.monitor.alarms import Alarm
from rcnn_trainer.monitor.period import PeriodMeans

from rcnn_trainer.monitor.checks.keys import WEIGHT_KEYS


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
    own scales. At equal weights the RoI cross-entropy over many classes can outweigh an IoU box
    loss by itself in a run that learns, and lowering its weight is not the remedy."""
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


