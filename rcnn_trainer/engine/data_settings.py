"""Settings the config leaves to the data (`auto`): resolved once, before the model is built.

Training resolves them from the training split and writes the numbers into the run folder's
config.yaml and every checkpoint; evaluation and prediction take them from the checkpoint.
"""

from __future__ import annotations

from typing import Callable

from rcnn_trainer.config import Config
from rcnn_trainer.errors import UserError
from rcnn_trainer.model.anchors import fit_anchor_sizes, fpn_strides

TORCHVISION_ANCHOR_BASE = 32.0  # used when the training split has no boxes to fit to


def resolve_from_data(cfg: Config, train_set, say: Callable[[str], None]) -> None:
    model = cfg.model
    if model.num_classes == "auto":
        model.num_classes = train_set.num_classes
        if model.num_classes < 1:
            raise UserError(f"'{train_set.ann_file}' has no categories, so model.num_classes: auto has nothing to "
                            f"count; add a 'categories' list to the file.")
        names = ", ".join(train_set.class_names[:12]) + (", ..." if model.num_classes > 12 else "")
        say(f"[auto] model.num_classes: {model.num_classes} (the categories of '{train_set.ann_file}': {names})")
    if model.anchors.sizes == "auto":
        strides = fpn_strides(model.backbone.name)
        try:
            sizes, reach = fit_anchor_sizes(
                train_set.records, levels=model.num_levels, aspect_ratios=model.anchors.aspect_ratios,
                strides=strides, min_size=cfg.data.min_size, max_size=cfg.data.max_size,
                fg_iou_thresh=model.rpn.fg_iou_thresh, seed=cfg.seed)
        except ValueError:
            sizes = [[TORCHVISION_ANCHOR_BASE * 2 ** level] for level in range(model.num_levels)]
            say(f"[auto] model.anchors.sizes: {sizes} (torchvision's; the training split has no boxes to fit to)")
        else:
            say(f"[auto] model.anchors.sizes: {sizes}, fitted to {reach['boxes']} training boxes after resize "
                f"(median side {reach['median_side']:.0f} px): {100 * reach['above_0.5']:.0f}% have an anchor with "
                f"IoU >= 0.5, {100 * reach['above_fg']:.0f}% >= rpn.fg_iou_thresh {model.rpn.fg_iou_thresh}")
        model.anchors.sizes = sizes


def resolve_from_checkpoint(cfg: Config, saved_config: dict) -> None:
    """`auto` settings take the values the checkpoint was trained with."""
    saved = saved_config.get("model", {})
    if cfg.model.num_classes == "auto" and isinstance(saved.get("num_classes"), int):
        cfg.model.num_classes = saved["num_classes"]
    if cfg.model.anchors.sizes == "auto" and isinstance(saved.get("anchors", {}).get("sizes"), list):
        cfg.model.anchors.sizes = saved["anchors"]["sizes"]
    if cfg.model.num_classes == "auto" or cfg.model.anchors.sizes == "auto":
        raise UserError("the checkpoint holds no resolved model.num_classes / model.anchors.sizes for the 'auto' "
                        "settings of the config; give them explicitly (the training run folder's config.yaml has them).")
