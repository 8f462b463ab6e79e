"""The compact dashboard block: losses and their shares, lr, grad norm, positives, IoU, what the
classifier says about the GT boxes of the probe images, and the threshold-count table."""

from __future__ import annotations

import math

from rcnn_trainer.losses.weighting import LOSS_NAMES, short_name
from rcnn_trainer.monitor.period import PeriodMeans
from rcnn_trainer.monitor.probe import ProbeResult
from rcnn_trainer.monitor.threshold_counts import format_threshold_table


def format_dashboard(iteration: int, max_iters: int, window: PeriodMeans, seen: ProbeResult,
                     last_eval: dict | None = None, improving: list[str] = ()) -> str:
    """window: means over the last period of the logged training numbers; seen: the probe;
    last_eval: the latest evaluation's {"iter", "val_loss", "AP"}, if any."""
    total = window.loss or 1e-12
    terms = "  ".join(f"{short_name(name)} {window.weighted[name]:.3f} ({100 * window.weighted[name] / total:.0f}%)"
                      for name in LOSS_NAMES if name in window.weighted)
    c = seen.classes
    lines = [
        f"---- monitor @ iter {iteration}/{max_iters} " + "-" * 40,
        f"  loss {window.loss:.3f} = {terms}",
        f"  lr {window.lr:.2e}  grad norm {window.grad_norm:.2f} (clipped {100 * window.clipped:.0f}% of steps)",
        f"  positives/img: rpn {window.rpn_pos:.1f}  roi {window.roi_pos:.1f}  (GT {window.gt_per_image:.1f})"
        f"  IoU: proposals {window.proposal_iou:.2f}  refined {window.roi_pred_iou:.2f}"
        f"  regressor std ratio {window.delta_std_ratio:.2f} corr {window.delta_corr:.2f}",
        f"  on GT boxes: foreground prob {c.fg_mass:.2f}  true class {100 * c.correct:.0f}% of it"
        f"  top-1 {100 * c.accuracy:.0f}%  margin {c.margin:.2f}"
        f"  spread {c.spread:.2f}",
        format_threshold_table(seen.counts),
    ]
    if last_eval is not None:
        lines.insert(2, f"  val loss {last_eval['val_loss']:.3f}  AP {last_eval['AP']:.3f} (evaluation at iter "
                        f"{last_eval['iter']})")
    if not math.isnan(window.mask_iou):
        lines.insert(4, f"  masks on positives: IoU {window.mask_iou:.2f} (a mask that ignores the RoI: "
                        f"{window.mask_trivial_iou:.2f})")
    if window.stage_ious:  # Cascade R-CNN: the same positives after each stage (must rise stage over stage)
        lines.insert(4, f"  cascade IoU of positives: proposals {window.proposal_iou:.2f} -> "
                        + " -> ".join(f"s{k} {v:.2f}" for k, v in enumerate(window.stage_ious, start=1)))
    lines += [f"  improving, not yet there: {note}" for note in improving]
    return "\n".join(lines)
