"""Evaluations during training and at its end: generalization_gap.

`overfitting` (overfitting.py) reads the trend over periodic evaluations: the val loss rising
while the training loss falls. This check reads one evaluation, the final one included, so it
also judges a run that evaluates only at the end (`train.eval_period: 0`): the val loss far
above the training loss, or val AP far below what the probe promises on the training images.
Both alarms name the levers that help a small real dataset (`generalization_levers`).
"""

from __future__ import annotations

import math

from rcnn_trainer.config_monitor import GeneralizationLimits
from rcnn_trainer.monitor.alarms import Alarm
from rcnn_trainer.monitor.probe import ProbeResult


def generalization_levers(pretrained: bool = False, augmenting: bool = False, tiling: bool = False) -> list[str]:
    """What helps a model that fits its training images and not others, each key named; what the
    run already uses goes last."""
    init = ("model.backbone.weights: imagenet (a pretrained backbone; or PATH), or model.init_from: PATH (a trained "
            "detector's checkpoint): features learned from far more images than yours" +
            (" (this run starts from pretrained weights already)" if pretrained else ""))
    augment = ("data.augment.*: vflip_prob and rot90_prob where orientation carries no meaning (aerial, microscopy, "
               "inspection), color_jitter, scale_jitter [0.75, 1.25]; data.hflip_prob where mirror-safe "
               "(docs/augment.md)" + (" (this run augments already: add the steps it lacks)" if augmenting else ""))
    iters = ("solver.max_iters: fewer iterations (with train.eval_period set, model_best.pth keeps the best val AP "
             "and the overfitting check shows where val stops improving)")
    tile = ("data.tiling: {size, overlap} when the objects are small in large images (train on tiles at full "
            "resolution instead of shrinking whole images)" + (" (on in this run)" if tiling else ""))
    items = [(init, pretrained), (augment, augmenting), (iters, False), (tile, tiling)]
    order = [text for text, used in items if not used] + [text for text, used in items if used]
    return order + ["data.train: more (or more varied) training images"]


def check_generalization_gap(evaluation: dict, probe: ProbeResult | None, levers: list[str],
                             limits: GeneralizationLimits = GeneralizationLimits(),
                             val_terms: dict | None = None, train_terms: dict | None = None) -> Alarm | None:
    """`evaluation`: {"iter", "val_loss", "train_loss", "AP", "AP50"} of one evaluation (the training
    loss: the latest monitor judgment's mean). Fires when the val loss is at least `loss_ratio`
    x and `min_loss_gap` above the training loss; or when the probe's training images look
    solved (detections at the threshold nearest `probe_score` within `count_tolerance` of their
    ground truth per image) while val AP50 is below `ap50_share` x the recall those counts
    promise. `val_terms` / `train_terms` (unweighted, by term): the term that differs most is named."""
    val, train = evaluation.get("val_loss", math.nan), evaluation.get("train_loss", math.nan)
    loss_gap = (math.isfinite(val) and math.isfinite(train) and train > 0 and val >= limits.loss_ratio * train
                and val - train >= limits.min_loss_gap)
    ap50 = evaluation.get("AP50")
    promise = promised_recall(probe, limits)
    ap_gap = promise is not None and ap50 is not None and math.isfinite(ap50) and ap50 < limits.ap50_share * promise
    if not (loss_gap or ap_gap):
        return None
    seen = []
    if loss_gap:
        seen.append(f"val loss {val:.3f} at iteration {evaluation['iter']} is {val / train:.1f}x the training loss "
                    f"{train:.3f}" + widest_term(val_terms, train_terms))
    if ap_gap:
        threshold, dets = probe.counts.nearest(limits.probe_score)
        seen.append(f"the probe's training images look solved ({dets:.1f} detections per image at score >= "
                    f"{threshold:g} against {probe.counts.gt_per_image:.1f} ground truth) while val AP50 is "
                    f"{ap50:.3f} (AP {evaluation.get('AP', math.nan):.3f})")
    return Alarm(
        name="generalization_gap",
        seen="; ".join(seen),
        why="the model fits its training images far better than images it has not seen: it memorizes them (too "
            "few or too alike for a model trained this long, most of all from scratch); its val AP is what users "
            "get",
        change=list(levers))


def promised_recall(probe: ProbeResult | None, limits: GeneralizationLimits) -> float | None:
    """min(detections, GT) / GT per probe image at the threshold nearest `probe_score`, when the
    counts match within `count_tolerance` (the training images look solved), else None."""
    if probe is None or not probe.counts.gt_per_image > 0:
        return None
    _, dets = probe.counts.nearest(limits.probe_score)
    gt = probe.counts.gt_per_image
    if abs(dets - gt) > limits.count_tolerance * gt:
        return None
    return min(dets, gt) / gt


def widest_term(val_terms: dict | None, train_terms: dict | None) -> str:
    """' (widest: rpn_cls 2.200 vs 0.014)': the loss term whose val value is the most times its training value."""
    if not val_terms or not train_terms:
        return ""
    ratios = {name: val_terms[name] / train_terms[name] for name in val_terms
              if train_terms.get(name, 0) > 0 and math.isfinite(val_terms[name])}
    if not ratios:
        return ""
    name = max(ratios, key=ratios.get)
    return f" (widest: {name.removeprefix('loss_')} {val_terms[name]:.3f} vs {train_terms[name]:.3f})"
