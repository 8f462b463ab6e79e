"""PeriodMeans: what the monitor reads from one period's means of the logged step numbers.

Built from the means dict (`window_means`, also logged as `mean/...` in metrics.jsonl and kept
in the monitor's checkpointed history) by `from_means`, the one place that knows the stats keys
of rcnn_trainer/model/stats.py. A statistic the model did not report is an error there, never
a silent default that would keep an alarm quiet or always firing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rcnn_trainer.losses.weighting import LOSS_NAMES
from rcnn_trainer.model import stats as S

# the statistics the checks and the dashboard read, and the field each becomes
STAT_FIELDS = {S.GT_PER_IMAGE: "gt_per_image", S.RPN_POS: "rpn_pos", S.ROI_POS: "roi_pos",
               S.RPN_PRED_IOU: "rpn_pred_iou", S.ROI_PRED_IOU: "roi_pred_iou", S.ROI_PROPOSAL_IOU: "proposal_iou",
               S.ROI_DELTA_STD_RATIO: "delta_std_ratio", S.ROI_DELTA_CORR: "delta_corr"}

MASK_FIELDS = {S.ROI_MASK_IOU: "mask_iou", S.ROI_MASK_TRIVIAL_IOU: "mask_trivial_iou"}  # only with masks on


@dataclass(frozen=True)
class PeriodMeans:
    loss: float                 # the weighted total
    lr: float
    grad_norm: float            # pre-clip
    clipped: float              # share of steps clipped
    terms: dict[str, float]     # each loss term the model computes, unweighted, by name (of LOSS_NAMES)
    weighted: dict[str, float]  # the same terms weighted
    gt_per_image: float
    rpn_pos: float              # positives sampled per image
    roi_pos: float
    rpn_pred_iou: float         # IoU of the decoded boxes of positives with their GT
    roi_pred_iou: float
    proposal_iou: float         # IoU of positive RPN proposals (GT boxes excluded) with their GT
    delta_std_ratio: float      # RoI regressor: std of predicted / target deltas on positives
    delta_corr: float           # and their correlation
    mask_iou: float = math.nan          # with masks on: IoU of the predicted masks of positives with their targets
    mask_trivial_iou: float = math.nan  # and the best a mask that ignores the RoI scores (full or mean)
    # with model.roi.cascade: the IoU of stage 1's positive proposals after each stage, stage 1 first
    stage_ious: tuple[float, ...] = ()

    @classmethod
    def from_means(cls, means: dict) -> "PeriodMeans":
        missing = [key for key in STAT_FIELDS if key not in means]
        if missing:
            raise KeyError(f"monitor history lacks {missing} (contract: rcnn_trainer/model/stats.py)")
        return cls(loss=means.get("loss", 0.0), lr=means.get("lr", 0.0), grad_norm=means.get("grad_norm", math.nan),
                   clipped=means.get("clipped", 0.0),
                   # only the terms this model computes (the mask term only with masks on)
                   terms={n: means[n] for n in LOSS_NAMES if n in means},
                   weighted={n: means.get(f"{n}_weighted", 0.0) for n in LOSS_NAMES if n in means},
                   **{name: means[key] for key, name in STAT_FIELDS.items()},
                   **{name: means[key] for key, name in MASK_FIELDS.items() if key in means},
                   stage_ious=stage_series(means, S.roi_stage_iou))


def stage_series(means: dict, key_of) -> tuple[float, ...]:
    """A cascade statistic of stages 1, 2, ... as long as the means have it (none: one stage)."""
    values, stage = [], 1
    while key_of(stage) in means:
        values.append(means[key_of(stage)])
        stage += 1
    return tuple(values)
