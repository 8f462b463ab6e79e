"""Each loss term's settings as one typed object, built once from the config (`head_losses`)
and read alike by the heads (to compute the loss) and the monitor (to know what a loss should
be at initialization)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClsLoss:
    type: str                   # rpn: bce | focal; roi: ce | focal
    pos_weight: float = 1.0     # foreground anchors / classes vs background
    alpha: float = 0.25         # sigmoid focal (rpn)
    gamma: float = 2.0          # focal
    avg_factor: str = "sampled"  # sampled | positives
    logit_adjust: float = 0.0   # roi: tau of the logit-adjusted loss (0 = off)


@dataclass(frozen=True)
class BoxLoss:
    type: str = "smooth_l1"     # smooth_l1 | l1 | giou | diou | ciou | wiou
    beta: float = 1.0 / 9.0     # smooth L1 transition
    avg_factor: str = "sampled"
    wiou_alpha: float = 1.9
    wiou_delta: float = 3.0
    wiou_momentum: float = 0.01


@dataclass(frozen=True)
class HeadLosses:
    cls: ClsLoss
    box: BoxLoss


def head_losses(head) -> HeadLosses:
    """From `model.rpn` or `model.roi` of the config."""
    c, b = head.cls_loss, head.box_loss
    return HeadLosses(ClsLoss(c.type, head.cls_pos_weight, c.alpha, c.gamma, c.avg_factor, c.logit_adjust),
                      BoxLoss(b.type, b.beta, b.avg_factor, b.wiou_alpha, b.wiou_delta, b.wiou_momentum))
