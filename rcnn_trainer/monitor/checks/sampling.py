"""What the samplers give the heads: foreground_starvation, proposal_iou_flat.

Each check takes plain numbers and returns an Alarm or None; its thresholds are a `monitor.*` group
(config_monitor.py), their measured reasons in docs/monitor.md.
"""

from __future__ import annotations

import math

from rcnn_trainer.config_monitor import (ProposalIouLimits,
                                         StarvationLimits)
from rcnn_trainer.monitor.alarms import Alarm
from rcnn_trainer.monitor.period import PeriodMeans


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
    converged RPN, not a stuck one."""
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


