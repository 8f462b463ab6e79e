"""The compact dashboard block: losses and their shares, lr, grad norm, positives, IoU,
and the threshold-count table from inference on a fixed probe set of training images."""

from __future__ import annotations

import torch

from rcnn_trainer.engine.evaluate import format_threshold_table, threshold_counts
from rcnn_trainer.losses.weighting import LOSS_NAMES


def box_spread(boxes: torch.Tensor) -> dict:
    """Std of box centres and sizes [N, 4] xyxy -> {cx, cy, w, h}."""
    if len(boxes) < 2:
        return {"cx": 0.0, "cy": 0.0, "w": 0.0, "h": 0.0}
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return {k: float(v.std()) for k, v in (("cx", cx), ("cy", cy), ("w", w), ("h", h))}


@torch.no_grad()
def probe(model: torch.nn.Module, images: list[torch.Tensor], gt_boxes: list[torch.Tensor],
          thresholds: list[float]) -> dict:
    """Inference on the probe images (eval mode): detections per image at each score
    threshold, GT per image, and the spread of predicted vs GT boxes (lowest threshold)."""
    was_training = model.training
    model.eval()
    try:
        detections = model(images)
    finally:
        model.train(was_training)
    counts = threshold_counts([(None, d) for d in detections], thresholds, sum(len(b) for b in gt_boxes) / len(images))
    kept = torch.cat([d["boxes"][d["scores"] >= thresholds[0]].float().cpu() for d in detections])
    return {"counts": counts,
            "pred_spread": box_spread(kept), "gt_spread": box_spread(torch.cat(gt_boxes)),
            "num_predictions": len(kept)}


def format_dashboard(iteration: int, max_iters: int, window: dict, counts: dict) -> str:
    """window: means over the last period of the logged training numbers."""
    total = window.get("loss", 0.0) or 1e-12
    terms = "  ".join(f"{name[5:]} {window.get(name + '_weighted', 0.0):.3f} "
                      f"({100 * window.get(name + '_weighted', 0.0) / total:.0f}%)" for name in LOSS_NAMES)
    lines = [
        f"---- monitor @ iter {iteration}/{max_iters} " + "-" * 40,
        f"  loss {window.get('loss', 0.0):.3f} = {terms}",
        f"  lr {window.get('lr', 0.0):.2e}  grad norm {window.get('grad_norm', 0.0):.2f} "
        f"(clipped {100 * window.get('clipped', 0.0):.0f}% of steps)",
        f"  positives/img: rpn {window.get('rpn/pos_per_image', 0.0):.1f}  roi {window.get('roi/pos_per_image', 0.0):.1f}"
        f"  mean IoU of positive proposals {window.get('roi/pos_proposal_iou', float('nan')):.3f}"
        f"  roi fg argmax {100 * window.get('roi/fg_argmax_fraction', 0.0):.1f}%",
        format_threshold_table(counts),
    ]
    return "\n".join(lines)
