"""Wrap a torchvision FasterRCNN state dict as an rcnn_trainer checkpoint.

torchvision's FasterRCNN and rcnn_trainer's TwoStageDetector use the same state-dict keys
(backbone.body.*, backbone.fpn.*, rpn.head.*, roi_heads.box_head.*, roi_heads.box_predictor.*),
so no key is renamed: this checks the file fits the config's model and adds the config, so
`rcnn-eval --checkpoint OUT` works on it.

  python tools/convert_torchvision_weights.py --config configs/r50_fpn_1x_coco.yaml \
      --weights fasterrcnn_resnet50_fpn_coco.pth --out converted.pth

Note: torchvision's COCO model has 91 outputs (90 ids + background): set model.num_classes: 90.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rcnn_trainer.config_loader import config_to_dict, load_config
from rcnn_trainer.runtime.checkpoint import write_checkpoint
from rcnn_trainer.errors import UserError
from rcnn_trainer.model.build import build_model


def convert(config: str, weights: str, out: str, overrides=()) -> None:
    cfg = load_config(config, overrides)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - missing, truncated or not a state dict: the user's file
        raise UserError(f"--weights '{weights}' could not be loaded as a state dict: {err}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if cfg.model.num_classes == "auto" or cfg.model.anchors.sizes == "auto":
        raise UserError(f"'{config}': converting needs explicit model.num_classes and model.anchors.sizes "
                        f"(torchvision's COCO model: 90 and [[32], [64], [128], [256], [512]]), not auto.")
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"'{weights}' does not fit the model of '{config}': {str(err).splitlines()[0]} "
                        f"(check model.num_classes, backbone.name, fpn_channels, roi.representation_size).") from None
    write_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg), "iteration": 0}, Path(out))
    print(f"wrote {out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--weights", required=True, help="torchvision FasterRCNN state dict (.pth)")
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        convert(args.config, args.weights, args.out, args.overrides)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
