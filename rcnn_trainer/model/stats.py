"""The training statistics the model reports next to its losses: one definition that the heads
fill and the monitor reads. A key missing from what a head returns is an error
(`require_stats`), never a silent default that would keep an alarm quiet or always firing.
"""

from __future__ import annotations

# RPN (per batch)
RPN_CLS_FACTOR = "avg_factor/rpn_cls"
RPN_BOX_FACTOR = "avg_factor/rpn_box"
RPN_POS = "rpn/pos_per_image"          # positive anchors sampled per image
RPN_NEG = "rpn/neg_per_image"
RPN_BOX_PER_POS = "rpn/box_loss_per_pos"
RPN_PRED_IOU = "rpn/pred_iou"          # IoU of the decoded boxes of positive anchors with their GT
# RoI head (per batch)
ROI_CLS_FACTOR = "avg_factor/roi_cls"
ROI_BOX_FACTOR = "avg_factor/roi_box"
ROI_POS = "roi/pos_per_image"
ROI_NEG = "roi/neg_per_image"
ROI_PROPOSAL_IOU = "roi/pos_proposal_iou"  # IoU of positive RPN proposals (GT boxes excluded) with their GT
ROI_FG_ARGMAX = "roi/fg_argmax_fraction"   # sampled RoIs whose argmax class is foreground
ROI_BOX_PER_POS = "roi/box_loss_per_pos"
ROI_PRED_IOU = "roi/pred_iou"              # IoU of the refined boxes of positive RoIs with their GT
ROI_DELTA_STD_RATIO = "roi/delta_std_ratio"  # std of predicted / target deltas over positives (mean of 4)
ROI_DELTA_CORR = "roi/delta_corr"            # correlation of predicted with target deltas (mean of 4)
# mask head (per batch, only with model.mask.enabled)
ROI_MASK_FACTOR = "avg_factor/roi_mask"
ROI_MASK_IOU = "roi/mask_iou"            # IoU of the predicted masks (logit > 0) of positives with their targets
ROI_MASK_TRIVIAL_IOU = "roi/mask_trivial_iou"  # the best a mask that ignores the RoI scores: full or the batch's mean
# Cascade R-CNN (per batch, only with model.roi.cascade), stage k = 1..K; stage 1's others are the RoI ones above
def roi_stage_iou(stage: int) -> str:
    """Mean IoU with their GT of stage 1's positive RPN proposals after `stage` refinements: the
    same boxes followed through the stages, so a stage that does not refine shows no rise."""
    return f"roi/stage_iou_s{stage}"


def roi_stage_pos(stage: int) -> str:
    return f"roi/pos_per_image_s{stage}"  # positives of stage k >= 2 at its own IoU threshold


def roi_stage_factors(stage: int) -> tuple[str, str]:
    return f"avg_factor/roi_cls_s{stage}", f"avg_factor/roi_box_s{stage}"


# The batch
GT_PER_IMAGE = "gt_per_image"
IMAGES = "images"

RPN_STATS = (RPN_CLS_FACTOR, RPN_BOX_FACTOR, RPN_POS, RPN_NEG, RPN_BOX_PER_POS, RPN_PRED_IOU)
ROI_STATS = (ROI_CLS_FACTOR, ROI_BOX_FACTOR, ROI_POS, ROI_NEG, ROI_PROPOSAL_IOU, ROI_FG_ARGMAX, ROI_BOX_PER_POS,
             ROI_PRED_IOU, ROI_DELTA_STD_RATIO, ROI_DELTA_CORR)
MASK_STATS = (ROI_MASK_FACTOR, ROI_MASK_IOU, ROI_MASK_TRIVIAL_IOU)
TRAIN_STATS = RPN_STATS + ROI_STATS + (GT_PER_IMAGE, IMAGES)


def require_stats(stats: dict, keys: tuple[str, ...] = TRAIN_STATS, where: str = "model") -> dict:
    missing = [k for k in keys if k not in stats]
    if missing:
        raise KeyError(f"{where} did not report the statistics {missing} (contract: rcnn_trainer/model/stats.py)")
    return stats


def refined_box_iou(pred_deltas, reference_boxes, gt_boxes, box_coder):
    """Mean IoU of the boxes decoded from `pred_deltas` ([P, 4]) with their GT; NaN when P < 2."""
    import torch

    from rcnn_trainer.losses.iou import paired_iou

    if pred_deltas.shape[0] < 2:
        return torch.tensor(float("nan"), device=pred_deltas.device)
    decoded = box_coder.decode_single(pred_deltas.detach().float(), reference_boxes.detach().float())
    return paired_iou(decoded, gt_boxes.detach().float()).mean()


def delta_agreement(pred_deltas, reference_boxes, gt_boxes, box_coder) -> tuple:
    """For positives ([P, 4] each): the std of the predicted deltas over the std of the target
    deltas, and their correlation (means over the 4 coordinates). A regressor that outputs a
    constant has both near 0 whatever boxes it is asked about. NaN when P < 2."""
    import torch

    nan = torch.tensor(float("nan"), device=pred_deltas.device)
    if pred_deltas.shape[0] < 2:
        return nan, nan
    pred = pred_deltas.detach().float()
    target = box_coder.encode_single(gt_boxes.detach().float(), reference_boxes.detach().float())
    pred_c, target_c = pred - pred.mean(dim=0), target - target.mean(dim=0)
    pred_std, target_std = pred_c.pow(2).mean(dim=0).sqrt(), target_c.pow(2).mean(dim=0).sqrt()
    # a coordinate whose targets do not vary (e.g. only appended GT boxes, all targets 0) cannot be
    # judged: NaN, which the monitor's period means skip (no host sync here)
    degenerate = target_std < 1e-3
    ratio = torch.where(degenerate, nan, pred_std / target_std.clamp(min=1e-3)).mean()
    corr = torch.where(degenerate, nan, (pred_c * target_c).mean(dim=0) / (pred_std * target_std).clamp(min=1e-12)).mean()
    return ratio, corr


def mask_agreement(mask_logits, mask_targets) -> tuple:
    """Over positives ([P, M, M] each): the mean IoU of the predicted masks (logit > 0) with their
    targets (>= 0.5), and the best mean IoU of a mask that ignores the RoI: the full box (blank
    scores 0) or the batch's mean target mask. A head that learned nothing cannot beat the
    second. NaN when P < 2."""
    import torch

    nan = torch.tensor(float("nan"), device=mask_logits.device)
    if mask_logits.shape[0] < 2:
        return nan, nan
    target = mask_targets.detach() >= 0.5

    def mean_iou(pred):
        inter = (pred & target).flatten(1).sum(1).float()
        return (inter / (pred | target).flatten(1).sum(1).float().clamp(min=1)).mean()

    mean_mask = (target.float().mean(dim=0, keepdim=True) >= 0.5).expand_as(target)
    trivial = torch.maximum(target.flatten(1).float().mean(1).mean(), mean_iou(mean_mask))
    return mean_iou(mask_logits.detach() > 0), trivial
