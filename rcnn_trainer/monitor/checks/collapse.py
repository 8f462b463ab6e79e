"""Detections collapsing to background: collapse.

Each check takes plain numbers and returns an Alarm or None; its thresholds are a `monitor.*` group
(config_monitor.py), their measured reasons in docs/monitor.md.
"""

from __future__ import annotations

from rcnn_trainer.config import CollapseConfig
from rcnn_trainer.monitor.alarms import Alarm


def check_collapse(history: list[float], gt_per_image: float, *, min_ratio: float, patience: int,
                   drop: float = CollapseConfig().drop, settle_ratio: float = CollapseConfig().settle_ratio
                   ) -> Alarm | None:
    """Detections per image at the lowest score threshold, one value per probe check.

    Fires when the last `patience` values are all below `min_ratio` * GT per image, or all more
    than `drop` below the peak before them. The peak counts only from the first check at which
    detections came down to at most `settle_ratio` x GT: early on, near-uniform scores put every
    proposal above the lowest threshold, and falling from there is learning, not collapse.
    A fall counts only to below GT per image: a detector still finding as many boxes as there are
    objects is getting confident, not predicting background.
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
