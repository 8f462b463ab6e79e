"""The compact dashboard block: losses and their shares, lr, grad norm, positives, IoU, what the
classifier says about the GT boxes of the probe images, and the threshold-count table."""

from __future__ import annotations

from rcnn_trainer.losses.weighting import LOSS_NAMES, short_name
from rcnn_trainer.model import stats as S
from rcnn_trainer.monitor.probe import ProbeResult
from rcnn_trainer.monitor.threshold_counts import format_threshold_table


def format_dashboard(iteration: int, max_iters: int, window: dict, seen: ProbeResult) -> str:
    """window: means over the last period of the logged training numbers; seen: the probe."""
    total = window.get("loss", 0.0) or 1e-12
    terms = "  ".join(f"{short_name(name)} {window.get(name + '_weighted', 0.0):.3f} "
                      f"({100 * window.get(name + '_weighted', 0.0) / total:.0f}%)" for name in LOSS_NAMES)
    c = seen.classes
    lines = [
        f"---- monitor @ iter {iteration}/{max_iters} " + "-" * 40,
        f"  loss {window.get('loss', 0.0):.3f} = {terms}",
        f"  lr {window.get('lr', 0.0):.2e}  grad norm {window.get('grad_norm', float('nan')):.2f} "
        f"(clipped {100 * window.get('clipped', 0.0):.0f}% of steps)",
        f"  positives/img: rpn {window[S.RPN_POS]:.1f}  roi {window[S.ROI_POS]:.1f}  (GT {window[S.GT_PER_IMAGE]:.1f})"
        f"  IoU: proposals {window[S.ROI_PROPOSAL_IOU]:.2f}  refined {window[S.ROI_PRED_IOU]:.2f}"
        f"  regressor std ratio {window[S.ROI_DELTA_STD_RATIO]:.2f} corr {window[S.ROI_DELTA_CORR]:.2f}",
        f"  on GT boxes: foreground prob {c.fg_mass:.2f}  true class {100 * c.correct:.0f}% of it"
        f"  top-1 {100 * c.accuracy:.0f}%  margin {c.margin:.2f}"
        f"  spread {c.spread:.2f}",
        format_threshold_table(seen.counts),
    ]
    return "\n".join(lines)
