"""Loss weights, applied in exactly one place."""

from __future__ import annotations

import torch

from rcnn_trainer.config import ModelConfig

LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_box", "loss_roi_cls", "loss_roi_box")


def loss_weights(model_cfg: ModelConfig) -> dict[str, float]:
    return {
        "loss_rpn_cls": model_cfg.rpn.cls_loss.weight,
        "loss_rpn_box": model_cfg.rpn.box_loss.weight,
        "loss_roi_cls": model_cfg.roi.cls_loss.weight,
        "loss_roi_box": model_cfg.roi.box_loss.weight,
    }


def weighted_total(losses: dict[str, torch.Tensor], weights: dict[str, float]):
    """(total, weighted terms). Unweighted terms stay in `losses` for logging."""
    weighted = {name: losses[name] * weights[name] for name in LOSS_NAMES if name in losses}
    return sum(weighted.values()), weighted
