"""Per-element classification losses (no reduction: the caller divides by avg_factor).

Objectness: BCE with a positive-class weight, or torchvision's sigmoid focal loss (times the
same positive weight). RoI classes: cross-entropy where each foreground class weighs
`pos_weight` relative to background, or softmax focal loss with the same weights (torchvision
ships only the sigmoid form; inference scores are a softmax, so training uses one too).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss


def objectness_loss_per_anchor(logits: torch.Tensor, labels: torch.Tensor, *, loss_type: str,
                               pos_weight: float, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """logits, labels: [S] (labels 0 or 1, sampled anchors only) -> [S]."""
    logits, labels = logits.float(), labels.float()
    if loss_type == "bce":
        return F.binary_cross_entropy_with_logits(
            logits, labels, pos_weight=torch.tensor(pos_weight, device=logits.device), reduction="none")
    if loss_type == "focal":
        weight = torch.where(labels > 0, pos_weight, 1.0)
        return sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma, reduction="none") * weight
    raise ValueError(f"unknown objectness loss '{loss_type}' (bce | focal)")


def class_loss_per_roi(logits: torch.Tensor, labels: torch.Tensor, *, loss_type: str,
                       pos_weight: float, gamma: float = 2.0) -> torch.Tensor:
    """logits: [R, C+1] (column 0 is background), labels: [R] in 0..C -> [R]."""
    logits = logits.float()
    class_weight = torch.full((logits.shape[1],), pos_weight, device=logits.device)
    class_weight[0] = 1.0
    if loss_type == "ce":
        return F.cross_entropy(logits, labels, weight=class_weight, reduction="none")
    if loss_type == "focal":
        log_p = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
        return -((1.0 - log_p.exp()) ** gamma) * log_p * class_weight[labels]
    raise ValueError(f"unknown RoI classification loss '{loss_type}' (ce | focal)")


def class_logit_offsets(object_counts: Sequence[float], tau: float) -> torch.Tensor:
    """[C+1] offsets for the training logits: 0 for background, tau x log(n_c / n_max) <= 0 for
    each foreground class with n_c training objects. The most frequent class keeps its logit (and
    the foreground / background balance the sampler sets); a class 27x rarer needs a logit
    log(27) higher to score the same in training, which it keeps at test. A class without
    objects counts as one."""
    counts = torch.tensor([max(float(n), 1.0) for n in object_counts], dtype=torch.float32)
    if not counts.numel():
        return torch.zeros(1)
    return torch.cat([torch.zeros(1), tau * torch.log(counts / counts.max())])
