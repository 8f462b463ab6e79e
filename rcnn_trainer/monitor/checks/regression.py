"""The box regressor and the mask head: regressor_collapse, mask_not_learning.

Each check takes plain numbers and returns an Alarm or None; its thresholds are a `monitor.*` group
(config_monitor.py), their measured reasons in docs/monitor.md.
"""

from __future__ import annotations

import math

from rcnn_trainer.config_monitor import (MaskLearningLimits, RegressorCollapseLimits)
from rcnn_trainer.monitor.alarms import Alarm
from rcnn_trainer.monitor.period import PeriodMeans


def check_regressor_collapse(history: list[PeriodMeans], *, sustain: int, box_weight: float | None = None,
                             limits: RegressorCollapseLimits = RegressorCollapseLimits()) -> Alarm | None:
    """On the positive RoIs of training: the predicted deltas (of the true class) hardly vary
    (std below `max_std_ratio` x the target deltas' std) and do not follow the targets
    (correlation below `min_corr`) for `sustain` periods, while their spread is either below
    `small` at every one of them (the regressor barely moves any box) or shrinking at every
    period, by at least 1 - `shrink` over the window, and not widening by `widen` x over it
    (to `constant` at least: a spread of 1e-8 that doubles is still none): the regressor is
    heading to a constant. Without a signal its outputs barely move any box, and weight decay
    pulls them in; a regressor that is learning holds or widens its spread before the
    correlation with the targets appears."""
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
        change=regressor_advice(box_weight))


def regressor_advice(box_weight: float | None) -> list[str]:
    """A box loss weighted 0 sends the regressor no signal at all: that weight is the cause, named
    first; otherwise the usual cause is an lr high enough to knock the outputs flat."""
    weight = ("model.roi.box_loss.weight: raise it if it is 0 or tiny (no signal reaches the regressor); "
              "lower it if it dominates")
    others = ["solver.lr: lower it (a too-high lr often ends here)", "solver.clip_grad_norm: set it (e.g. 10)"]
    if box_weight == 0:
        return ["model.roi.box_loss.weight: raise it from 0 (1.0 is Faster R-CNN's): no signal reaches the regressor",
                *others]
    return [*others, weight]


def check_mask_not_learning(history: list[PeriodMeans], *, sustain: int,
                            limits: MaskLearningLimits = MaskLearningLimits()) -> Alarm | None:
    """With masks on, after warmup: on the positive RoIs of training, the predicted masks score
    no better than a mask that ignores the RoI (the full box, or the batch's mean mask; a blank
    one scores 0), within `margin`, for `sustain` periods, and the mask loss does not fall by
    `min_fall` over them: the mask head learned nothing (a head that learns lowers its loss,
    even while it passes through blank masks; the IoU of an unlearned head is noise)."""
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


