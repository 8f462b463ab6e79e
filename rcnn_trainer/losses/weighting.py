"""Loss weights, applied in exactly one place, optionally ramped over the first iterations.

The weights are plain numbers here: `build_loss_weights(model_cfg)` (model/build.py) reads
them from the config once, into a `LossWeights`; this module imports no config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch


@dataclass(frozen=True)
class LossTerm:
    """One term of the total: its key in the model's loss dict, how logs and the dashboard name
    it, its head, its kind and the config section that sets its weight and weight_ramp (a name
    for messages; build_loss_weights reads the values)."""
    name: str
    short: str
    head: str        # "rpn", "roi" or "mask"
    kind: str        # "cls", "box" or "mask"
    config_key: str  # e.g. model.roi.box_loss
    weight_key: str = ""  # the key alarms name for its weight when not `<config_key>.weight`


LOSS_TERMS = {t.name: t for t in (LossTerm("loss_rpn_cls", "rpn_cls", "rpn", "cls", "model.rpn.cls_loss"),
                                  LossTerm("loss_rpn_box", "rpn_box", "rpn", "box", "model.rpn.box_loss"),
                                  LossTerm("loss_roi_cls", "roi_cls", "roi", "cls", "model.roi.cls_loss"),
                                  LossTerm("loss_roi_box", "roi_box", "roi", "box", "model.roi.box_loss"),
                                  LossTerm("loss_roi_mask", "roi_mask", "mask", "mask", "model.mask.loss"))}
# Cascade R-CNN's later stages (model.roi.cascade; stage 1 keeps the names above): the head's
# weight times the stage's, up to config_model.MAX_CASCADE_STAGES
LOSS_TERMS.update({t.name: t for stage in range(2, 7) for t in (
    LossTerm(f"loss_roi_cls_s{stage}", f"roi_cls_s{stage}", "roi", "cls", "model.roi.cls_loss",
             "model.roi.cascade.stage_weights"),
    LossTerm(f"loss_roi_box_s{stage}", f"roi_box_s{stage}", "roi", "box", "model.roi.box_loss",
             "model.roi.cascade.stage_weights"))})
LOSS_NAMES = tuple(LOSS_TERMS)


def short_name(loss_name: str) -> str:
    return LOSS_TERMS[loss_name].short


@dataclass(frozen=True)
class Ramp:
    """The weight goes from `start` at iteration 0 to the term's weight at `iters`."""
    start: float
    iters: int
    shape: str = "linear"  # linear | cosine


@dataclass(frozen=True)
class TermWeight:
    weight: float                 # the final weight
    ramp: Optional[Ramp] = None   # None: `weight` from the first iteration

    def at(self, iteration: int) -> float:
        return ramped_weight(self.weight, self.ramp, iteration)


@dataclass(frozen=True)
class LossWeights:
    """The weight of each term the model computes, keyed by loss name (LOSS_NAMES; the mask
    term only with masks on)."""
    terms: Mapping[str, TermWeight]

    def __post_init__(self):
        unknown = set(self.terms) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; expected names from {LOSS_NAMES}")

    def at(self, iteration: int) -> dict[str, float]:
        """Each term's weight at `iteration` (ramped where its ramp says so)."""
        return {name: term.at(iteration) for name, term in self.terms.items()}

    def final(self) -> dict[str, float]:
        """Each term's weight after any ramp."""
        return {name: term.weight for name, term in self.terms.items()}


def ramped_weight(final: float, ramp: Optional[Ramp], iteration: int) -> float:
    """`ramp.start` at iteration 0 to `final` at `ramp.iters` (linear or cosine), then `final`."""
    if ramp is None or iteration >= ramp.iters:
        return final
    progress = iteration / ramp.iters
    if ramp.shape == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return ramp.start + (final - ramp.start) * progress


def weighted_total(losses: dict[str, torch.Tensor], weights: dict[str, float]):
    """(total, weighted terms). Unweighted terms stay in `losses` for logging."""
    weighted = {name: losses[name] * weights[name] for name in LOSS_NAMES if name in losses}
    return sum(weighted.values()), weighted
