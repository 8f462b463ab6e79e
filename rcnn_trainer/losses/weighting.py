"""Loss weights, applied in exactly one place, optionally ramped over the first iterations."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rcnn_trainer.config import ModelConfig, WeightRamp


@dataclass(frozen=True)
class LossTerm:
    """One term of the total: its key in the model's loss dict, how logs and the dashboard name
    it, its head, its kind and the config section that sets it (its weight and weight_ramp)."""
    name: str
    short: str
    head: str        # "rpn", "roi" or "mask"
    kind: str        # "cls", "box" or "mask"
    config_key: str  # e.g. model.roi.box_loss


LOSS_TERMS = {t.name: t for t in (LossTerm("loss_rpn_cls", "rpn_cls", "rpn", "cls", "model.rpn.cls_loss"),
                                  LossTerm("loss_rpn_box", "rpn_box", "rpn", "box", "model.rpn.box_loss"),
                                  LossTerm("loss_roi_cls", "roi_cls", "roi", "cls", "model.roi.cls_loss"),
                                  LossTerm("loss_roi_box", "roi_box", "roi", "box", "model.roi.box_loss"),
                                  LossTerm("loss_roi_mask", "roi_mask", "mask", "mask", "model.mask.loss"))}
LOSS_NAMES = tuple(LOSS_TERMS)


def short_name(loss_name: str) -> str:
    return LOSS_TERMS[loss_name].short


def _loss_configs(model_cfg: ModelConfig) -> dict:
    """The config section of each term the model computes (the mask term only with masks on)."""
    sections = {}
    for name, term in LOSS_TERMS.items():
        if term.head == "mask" and not model_cfg.mask.enabled:
            continue
        node = model_cfg
        for part in term.config_key.split(".")[1:]:
            node = getattr(node, part)
        sections[name] = node
    return sections


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
