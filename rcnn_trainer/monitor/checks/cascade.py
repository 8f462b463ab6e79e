"""Cascade R-CNN's stages: cascade_stage_not_improving.

Each check takes plain numbers and returns an Alarm or None; its thresholds are a `monitor.*` group
(config_monitor.py), their measured reasons in docs/monitor.md.
"""

from __future__ import annotations

import math

from rcnn_trainer.config_monitor import CascadeLimits
from rcnn_trainer.monitor.alarms import Alarm
from rcnn_trainer.monitor.period import PeriodMeans


def check_cascade_stages(history: list[PeriodMeans], *, sustain: int,
                         limits: CascadeLimits = CascadeLimits()) -> Alarm | None:
    """From the `min_periods`-th judgment after warmup on: a stage k >= 2 whose boxes beat stage
    k-1's by less than `min_gain` IoU (the same positives followed through the stages, model/stats.py)
    at each of the last `sustain` judgments. Each stage exists to refine the one before. The
    default is below zero: a healthy last stage lags its predecessor a little while it learns,
    then gains little, so the check names a stage that makes the boxes worse (a box coder weight
    far too small amplifies its regressor's noise into the boxes), not one that gains little."""
    if len(history) < max(sustain, limits.min_periods) or not history[-1].stage_ious:
        return None
    recent = history[-sustain:]
    for k in range(1, len(recent[-1].stage_ious)):
        gains = [h.stage_ious[k] - h.stage_ious[k - 1] if len(h.stage_ious) > k else math.nan for h in recent]
        if all(not math.isnan(g) and g < limits.min_gain for g in gains):
            series = ", ".join(f"{h.stage_ious[k - 1]:.3f} -> {h.stage_ious[k]:.3f}" for h in recent)
            return Alarm(
                name="cascade_stage_not_improving", subject=f"s{k + 1}",
                seen=f"IoU of the positives after stage {k} -> after stage {k + 1}: {series} over the last {sustain} "
                     f"judgments (a gain below monitor.cascade.min_gain={limits.min_gain:g})",
                why=f"stage {k + 1} does not refine stage {k}'s boxes, it moves them away: the last stage's boxes are "
                    f"the ones the detector outputs, and the next stage trains its classifier on them",
                change=[f"model.roi.cascade.box_coder_weights: stage {k + 1}'s should be about its deltas' inverse "
                        f"spread (detectron2: 10/20/30 for stages 1/2/3)",
                        f"model.roi.cascade.iou_thresholds: stage {k + 1}'s above what stage {k}'s boxes reach leaves "
                        f"it few positives (see roi/pos_per_image_s{k + 1})",
                        "model.roi.cascade.stages: fewer stages if the data's boxes are already tight"])
    return None
