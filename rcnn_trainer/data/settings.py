"""Settings the config leaves to the data (`auto`): resolved once, before the model is built.

Training resolves them from the training split and writes the numbers into the run folder's
config.yaml and every checkpoint; evaluation and prediction take them from the checkpoint.
"""

from __future__ import annotations

from typing import Callable

from rcnn_trainer.config import Config
from rcnn_trainer.errors import UserError
from rcnn_trainer.data.anchor_fit import fit_anchor_sizes, fpn_strides
from rcnn_trainer.data.checkpoint_settings import settings_from_checkpoint
from rcnn_trainer.data.head_size import LIGHT_HEAD, MANY_CLASSES, WIDE_HEAD, head_for

TORCHVISION_ANCHOR_BASE = 32.0  # used when the training split has no boxes to fit to
# the `auto` head settings -> their key in head_size's LIGHT_HEAD / WIDE_HEAD
HEAD_SETTINGS = {"backbone.fpn_channels": "fpn_channels", "roi.representation_size": "representation_size",
                 "roi.batch_size_per_image": "roi_batch_size_per_image", "mask.num_convs": "mask_num_convs",
                 "mask.conv_channels": "mask_conv_channels"}


def prepare_datasets(cfg: Config, say: Callable[[str], None], world_size: int = 1):
    """The resolved config and both splits, with the `auto` settings and `solver.max_epochs`
    resolved from the training split: the one path that training and `rcnn-train --preflight`
    share, so the preflight checks what training will run. `cfg` itself is not changed."""
    from rcnn_trainer.data.loader import build_dataset

    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    resolved = resolve_from_data(cfg, train_set, say)
    resolved = resolve_max_epochs(resolved, len(train_set), world_size, say)
    check_dataset_fits_model(resolved, train_set)
    check_dataset_fits_model(resolved, val_set)
    return resolved, train_set, val_set


def check_dataset_fits_model(cfg: Config, dataset) -> None:
    if dataset.num_classes != cfg.model.num_classes:
        raise UserError(f"model.num_classes is {cfg.model.num_classes} but '{dataset.ann_file}' has "
                        f"{dataset.num_classes} categories ({', '.join(dataset.class_names[:10])}); "
                        f"set model.num_classes={dataset.num_classes} (or auto).")


def resolve_max_epochs(cfg: Config, train_images: int, world_size: int, say: Callable[[str], None]) -> Config:
    """`solver.max_epochs` as iterations: epochs x (training images // global batch)."""
    epochs = cfg.solver.max_epochs
    if epochs is None:
        return cfg
    per_epoch = max(1, train_images // (cfg.data.batch_size * world_size))
    iterations = epochs * per_epoch
    if cfg.solver.steps and cfg.solver.steps[-1] >= iterations:
        raise UserError(f"solver.max_epochs={epochs} gives {iterations} iterations ({per_epoch} per epoch) but "
                        f"solver.steps {cfg.solver.steps} go beyond; give steps below {iterations}.")
    say(f"solver.max_epochs={epochs}: {per_epoch} iterations per epoch, max_iters={iterations}")
    return cfg.with_settings({"solver.max_iters": iterations})


def resolve_from_data(cfg: Config, train_set, say: Callable[[str], None]) -> Config:
    """A new config with the model's `auto` settings fitted to the training split (those that
    shape the detector: from the `model.init_from` checkpoint first, checkpoint_settings.py)."""
    if cfg.model.init_from:
        from_checkpoint = settings_from_checkpoint(cfg, train_set, say)
        cfg = cfg.with_settings(from_checkpoint) if from_checkpoint else cfg
    model = cfg.model
    updates: dict = {}
    num_classes = model.num_classes
    if num_classes == "auto":
        num_classes = updates["model.num_classes"] = train_set.num_classes
        if num_classes < 1:
            raise UserError(f"'{train_set.ann_file}' has no categories, so model.num_classes: auto has nothing to "
                            f"count; add a 'categories' list to the file.")
        names = ", ".join(train_set.class_names[:12]) + (", ..." if num_classes > 12 else "")
        say(f"[auto] model.num_classes: {num_classes} (the categories of '{train_set.ann_file}': {names})")
    updates.update(head_size_settings(model, num_classes, say))
    if model.anchors.sizes == "auto":
        updates["model.anchors.sizes"] = fitted_anchor_sizes(cfg, train_set, say)
    return cfg.with_settings(updates) if updates else cfg


def fitted_anchor_sizes(cfg: Config, train_set, say: Callable[[str], None]) -> list[list[float]]:
    model = cfg.model
    records, tiling = train_set.records, cfg.data.tiling
    if tiling is not None:  # the objects as the tiles show them
        from rcnn_trainer.data.tiled_dataset import tile_records

        records = tile_records(records, tiling.size, tiling.overlap, tiling.min_visible)
    try:
        sizes, reach = fit_anchor_sizes(
            records, levels=model.num_levels, aspect_ratios=model.anchors.aspect_ratios,
            strides=fpn_strides(model.backbone.name), min_size=cfg.data.test_min_size, max_size=cfg.data.max_size,
            fg_iou_thresh=model.rpn.fg_iou_thresh, seed=cfg.seed)
    except ValueError:
        sizes = [[TORCHVISION_ANCHOR_BASE * 2 ** level] for level in range(model.num_levels)]
        say(f"[auto] model.anchors.sizes: {sizes} (torchvision's; the training split has no boxes to fit to)")
        return sizes
    say(f"[auto] model.anchors.sizes: {sizes}, fitted to {reach['boxes']} training boxes after resize "
        f"(median side {reach['median_side']:.0f} px): {100 * reach['above_0.5']:.0f}% have an anchor with "
        f"IoU >= 0.5, {100 * reach['above_fg']:.0f}% >= rpn.fg_iou_thresh {model.rpn.fg_iou_thresh}")
    return sizes


def head_size_settings(model, num_classes: int, say: Callable[[str], None]) -> dict:
    """FPN width, box-head width and RoIs per image left at `auto`: by the number of classes."""
    head = head_for(num_classes)
    shown = [key for key in HEAD_SETTINGS if model.mask.enabled or not key.startswith("mask.")]
    chosen = {f"model.{key}": head[HEAD_SETTINGS[key]] for key in shown if model.setting(key) == "auto"}
    if chosen:
        wide = head is WIDE_HEAD
        light_sizes, wide_sizes = ("/".join(str(h[HEAD_SETTINGS[k]]) for k in shown) for h in (LIGHT_HEAD, WIDE_HEAD))
        say(f"[auto] {', '.join(f'{k}: {v}' for k, v in chosen.items())}: the {'wide' if wide else 'light'} head "
            f"for {num_classes} classes ({'>=' if wide else '<'} {MANY_CLASSES}; light {light_sizes}, "
            f"wide {wide_sizes})")
    return chosen


def resolve_head_size(cfg: Config, say: Callable[[str], None]) -> Config:
    return cfg.with_settings(head_size_settings(cfg.model, cfg.model.num_classes, say))


def resolve_from_checkpoint(cfg: Config, saved_config: dict) -> Config:
    """A new config whose `auto` settings take the values the checkpoint was trained with."""
    updates, missing = {}, []
    for key in cfg.model.unresolved():
        value = saved_config.get("model", {})
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, list)) and not isinstance(value, bool):
            updates[f"model.{key}"] = value
        else:
            missing.append(f"model.{key}")
    if missing:
        raise UserError(f"the checkpoint holds no resolved {', '.join(missing)} for the 'auto' settings of the "
                        f"config; give them explicitly (the training run folder's config.yaml has them).")
    return cfg.with_settings(updates) if updates else cfg
