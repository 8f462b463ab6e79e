"""Loss weights, applied in exactly one place, optionally ramped over the first iterations."""

from __future__ import annotations

import math

import torch

from rcnn_trainer.config import ModelConfig, WeightRamp

LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_box", "loss_roi_cls", "loss_roi_box")


def _loss_configs(model_cfg: ModelConfig) -> dict:
    return {"loss_rpn_cls": model_cfg.rpn.cls_loss, "loss_rpn_box": model_cfg.rpn.box_loss,
            "loss_roi_cls": model_cfg.roi.cls_loss, "loss_roi_box": model_cfg.roi.box_loss}


def ramped_weight(final: float, ramp: WeightRamp | None, iteration: int) -> float:
    """`ramp.start` at iteration 0 to `final` at `ramp.iters` (linear or cosine), then `final`."""
    if ramp is None or iteration >= ramp.iters:
        return final
    progress = iteration / ramp.iters
    if ramp.shape == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return ramp.start + (final - ramp.start) * progress


def loss_weights(model_cfg: ModelConfig, iteration: int | None = None) -> dict[str, float]:
    """Weight of each term at `iteration` (None: the final weights)."""
    return {name: loss.weight if iteration is None else ramped_weight(loss.weight, loss.weight_ramp, iteration)
            for name, loss in _loss_configs(model_cfg).items()}


def weighted_total(losses: dict[str, torch.Tensor], weights: dict[str, float]):
    """(total, weighted terms). Unweighted terms stay in `losses` for logging."""
    weighted = {name: losses[name] * weights[name] for name in LOSS_NAMES if name in losses}
    return sum(weighted.values()), weighted
