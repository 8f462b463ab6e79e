"""The config keys alarms name for each loss term."""

from __future__ import annotations

from rcnn_trainer.losses.weighting import LOSS_TERMS

WEIGHT_KEYS = {name: term.weight_key or f"{term.config_key}.weight" for name, term in LOSS_TERMS.items()}
BOX_TYPE_KEYS = {"rpn": "model.rpn.box_loss.type", "roi": "model.roi.box_loss.type"}
