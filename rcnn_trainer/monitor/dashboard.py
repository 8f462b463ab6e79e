"""The compact dashboard block (losses and their shares, lr, grad norm, positives, IoU) and the
probe: inference on a fixed set of training images, giving the threshold-count table and what
the classifier says about the ground-truth boxes themselves."""

from __future__ import annotations

import torch

from rcnn_trainer.losses.weighting import LOSS_NAMES
from rcnn_trainer.model import stats as S
from rcnn_trainer.monitor.threshold_counts import format_threshold_table, threshold_counts


def class_diagnosis(probabilities: torch.Tensor, labels: torch.Tensor) -> dict:
    """probabilities [B, C+1] (column 0 background) on GT boxes with labels [B] in 1..C:
    fg_mass      mean 1 - p(background): does the head see an object where there is one?
    correct      mean p(true class) / fg_mass: of the foreground mass, how much is on the right class
    accuracy     share of boxes whose top foreground class is the true class
    margin       mean gap between the two highest foreground probabilities, over fg_mass
    spread       mean total-variation distance between each box's class distribution (its
                 foreground probabilities over fg_mass) and their mean over all boxes: ~0 when
                 the head gives every object the same class distribution (it has learned the
                 class prior and nothing from the image, as with labels that carry no signal)
    (NaN without boxes; with one foreground class `correct` and `accuracy` are 1, `spread` 0)."""
    if not len(labels):
        nan = float("nan")
        return {"fg_mass": nan, "correct": nan, "accuracy": nan, "margin": nan, "spread": nan}
    fg = probabilities[:, 1:]
    mass = fg.sum(dim=1).clamp(min=1e-12)
    true = fg.gather(1, (labels - 1).long()[:, None]).squeeze(1)
    top2 = fg.topk(min(2, fg.shape[1]), dim=1).values
    margin = top2[:, 0] - top2[:, 1] if fg.shape[1] > 1 else top2[:, 0]
    shares = fg / mass[:, None]
    spread = 0.5 * (shares - shares.mean(dim=0)).abs().sum(dim=1)
    return {"fg_mass": float(mass.mean()), "correct": float((true / mass).mean()),
            "accuracy": float((fg.argmax(dim=1) == labels - 1).float().mean()),
            "margin": float((margin / mass).mean()), "spread": float(spread.mean())}


@torch.no_grad()
def probe(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict], thresholds: list[float]) -> dict:
    """Inference on the probe images (eval mode): detections per image at each score threshold
    next to GT per image, and the class diagnosis on the GT boxes."""
    was_training = model.training
    model.eval()
    try:
        detections = model(images)
        boxes = [t["boxes"].to(images[0].device) for t in targets]
        probabilities = model.classify_boxes(images, boxes) if sum(len(b) for b in boxes) else None
    finally:
        model.train(was_training)
    labels = torch.cat([t["labels"] for t in targets]).to(images[0].device)
    counts = threshold_counts([(None, d) for d in detections], thresholds, len(labels) / len(images))
    diagnosis = class_diagnosis(probabilities, labels) if probabilities is not None else class_diagnosis(
        torch.zeros(0, 1), labels)
    return {"counts": counts, "classes": diagnosis}


def format_dashboard(iteration: int, max_iters: int, window: dict, seen: dict) -> str:
    """window: means over the last period of the logged training numbers; seen: the probe."""
    total = window.get("loss", 0.0) or 1e-12
    terms = "  ".join(f"{name[5:]} {window.get(name + '_weighted', 0.0):.3f} "
                      f"({100 * window.get(name + '_weighted', 0.0) / total:.0f}%)" for name in LOSS_NAMES)
    c = seen["classes"]
    lines = [
        f"---- monitor @ iter {iteration}/{max_iters} " + "-" * 40,
        f"  loss {window.get('loss', 0.0):.3f} = {terms}",
        f"  lr {window.get('lr', 0.0):.2e}  grad norm {window.get('grad_norm', float('nan')):.2f} "
        f"(clipped {100 * window.get('clipped', 0.0):.0f}% of steps)",
        f"  positives/img: rpn {window[S.RPN_POS]:.1f}  roi {window[S.ROI_POS]:.1f}  (GT {window[S.GT_PER_IMAGE]:.1f})"
        f"  IoU: proposals {window[S.ROI_PROPOSAL_IOU]:.2f}  refined {window[S.ROI_PRED_IOU]:.2f}"
        f"  regressor std ratio {window[S.ROI_DELTA_STD_RATIO]:.2f} corr {window[S.ROI_DELTA_CORR]:.2f}",
        f"  on GT boxes: foreground prob {c['fg_mass']:.2f}  true class {100 * c['correct']:.0f}% of it"
        f"  top-1 {100 * c['accuracy']:.0f}%  margin {c['margin']:.2f}"
        f"  spread {c['spread']:.2f}",
        format_threshold_table(seen["counts"]),
    ]
    return "\n".join(lines)
