"""Settings the config leaves to the data (`auto`): resolved once, before the model is built.

Training resolves them from the training split and writes the numbers into the run folder's
config.yaml and every checkpoint; evaluation and prediction take them from the checkpoint.
"""

from __future__ import annotations

from typing import Callable

from rcnn_trainer.config import Config
from rcnn_trainer.errors import UserError
from rcnn_trainer.model.anchors import fit_anchor_sizes, fpn_strides
from rcnn_trainer.model.head_size import LIGHT_HEAD, MANY_CLASSES, WIDE_HEAD, head_for

TORCHVISION_ANCHOR_BASE = 32.0  # used when the training split has no boxes to fit to
# the `auto` head settings -> their key in head_size's LIGHT_HEAD / WIDE_HEAD
HEAD_SETTINGS = {"backbone.fpn_channels": "fpn_channels", "roi.representation_size": "representation_size",
                 "roi.batch_size_per_image": "roi_batch_size_per_image"}


def prepare_datasets(cfg: Config, say: Callable[[str], None]):
    """Both splits, with the `auto` settings resolved from the training one: the one path that
    training and `rcnn-train --preflight` share, so the preflight checks what training will run."""
    from rcnn_trainer.data.loader import build_dataset

    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    resolve_from_data(cfg, train_set, say)
    check_dataset_fits_model(cfg, train_set)
    check_dataset_fits_model(cfg, val_set)
    return train_set, val_set


def check_dataset_fits_model(cfg: Config, dataset) -> None:
    if dataset.num_classes != cfg.model.num_classes:
        raise UserError(f"model.num_classes is {cfg.model.num_classes} but '{dataset.ann_file}' has "
                        f"{dataset.num_classes} categories ({', '.join(dataset.class_names[:10])}); "
                        f"set model.num_classes={dataset.num_classes} (or auto).")


def resolve_from_data(cfg: Config, train_set, say: Callable[[str], None]) -> None:
    model = cfg.model
    if model.num_classes == "auto":
        model.num_classes = train_set.num_classes
        if model.num_classes < 1:
            raise UserError(f"'{train_set.ann_file}' has no categories, so model.num_classes: auto has nothing to "
                            f"count; add a 'categories' list to the file.")
        names = ", ".join(train_set.class_names[:12]) + (", ..." if model.num_classes > 12 else "")
        say(f"[auto] model.num_classes: {model.num_classes} (the categories of '{train_set.ann_file}': {names})")
    resolve_head_size(cfg, say)
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


def resolve_head_size(cfg: Config, say: Callable[[str], None]) -> None:
    """FPN width, box-head width and RoIs per image left at `auto`: by the number of classes."""
    model = cfg.model
    head = head_for(model.num_classes)
    chosen = []
    for key, head_key in HEAD_SETTINGS.items():
        if model.setting(key) == "auto":
            model.set_setting(key, head[head_key])
            chosen.append(f"model.{key}: {head[head_key]}")
    if chosen:
        wide = head is WIDE_HEAD
        light_sizes, wide_sizes = ("/".join(str(h[k]) for k in HEAD_SETTINGS.values()) for h in (LIGHT_HEAD, WIDE_HEAD))
        say(f"[auto] {', '.join(chosen)}: the {'wide' if wide else 'light'} head for {model.num_classes} classes "
            f"({'>=' if wide else '<'} {MANY_CLASSES}; light {light_sizes}, wide {wide_sizes})")


def resolve_from_checkpoint(cfg: Config, saved_config: dict) -> None:
    """`auto` settings take the values the checkpoint was trained with."""
    missing = []
    for key in cfg.model.unresolved():
        value = saved_config.get("model", {})
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, list)) and not isinstance(value, bool):
            cfg.model.set_setting(key, value)
        else:
            missing.append(f"model.{key}")
    if missing:
        raise UserError(f"the checkpoint holds no resolved {', '.join(missing)} for the 'auto' settings of the "
                        f"config; give them explicitly (the training run folder's config.yaml has them).")
