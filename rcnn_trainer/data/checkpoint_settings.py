"""`model.init_from`: the architecture settings left at `auto` take the checkpoint's values.

Fine-tuning keeps the detector it starts from (detectron2's MODEL.WEIGHTS, torchvision's
tutorial): only the class-dependent predictor changes with the class count. So before the
`auto` settings are sized for the new data (head_size.py, anchor_fit.py), those that shape
tensors (FPN width, box-head width, RoIAlign size, anchors per location, the mask head) and the
RoI batch the heads were trained with come from the checkpoint: the resolved config an
rcnn_trainer checkpoint carries, or, for a torchvision FasterRCNN / MaskRCNN state dict, the
tensors' shapes (its anchors: torchvision's defaults). A value the config sets that contradicts
the checkpoint is kept and named in the log with what it costs: the share of the checkpoint's
parameters that then cannot load. Anchor sizes follow the checkpoint (its RPN was trained for
them), with a warning when the data would fit other sizes better.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from rcnn_trainer.config import Config
from rcnn_trainer.data.anchor_fit import best_anchor_ious, fit_anchor_sizes, fpn_strides, resized_boxes, sample_records
from rcnn_trainer.data.head_size import head_for
from rcnn_trainer.safe_load import load_weights_only

TORCHVISION_ANCHORS = [[32.0], [64.0], [128.0], [256.0], [512.0]]  # torchvision's FasterRCNN, 3 ratios a level
# a setting -> the checkpoint's tensors that do not load when it differs (None: it shapes no tensor)
COSTS = {
    "backbone.name": ("backbone.",),
    "backbone.fpn_channels": ("backbone.fpn.", "rpn.head.", "roi_heads.box_head.fc6.", "roi_heads.mask_head."),
    "roi.representation_size": ("roi_heads.box_head.", "roi_heads.box_predictor."),
    "roi.pool_size": ("roi_heads.box_head.fc6.",),
    "anchors.per_location": ("rpn.head.cls_logits.", "rpn.head.bbox_pred."),
    "mask.num_convs": ("roi_heads.mask_head.",),
    "mask.conv_channels": ("roi_heads.mask_head.", "roi_heads.mask_predictor.conv5_mask."),
    "roi.batch_size_per_image": None,
    "anchors.sizes": None,
}
FROM_CHECKPOINT = ("backbone.fpn_channels", "roi.representation_size", "roi.batch_size_per_image", "anchors.sizes",
                   "mask.num_convs", "mask.conv_channels")  # the `auto` settings a checkpoint resolves
ANCHOR_GAIN_WORTH_A_WARNING = 0.02  # share of the training boxes


def read_checkpoint(path: Path) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """(the resolved model config of an rcnn_trainer checkpoint or None, its tensors by name)."""
    obj = load_weights_only(path, "model.init_from")
    config = obj.get("config") if isinstance(obj, dict) else None
    saved = config.get("model") if isinstance(config, dict) else None
    state = obj.get("model", obj) if isinstance(obj, dict) else {}
    if not isinstance(state, dict):
        state = {}
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()
             if isinstance(v, torch.Tensor)}
    return (saved if isinstance(saved, dict) else None), state


def architecture(saved: dict | None, state: dict[str, torch.Tensor], aspect_ratios: int) -> dict:
    """The checkpoint's architecture settings (dotted keys under `model.`; `anchors.per_location`
    is the RPN head's anchors per position), from its config, else from its tensors' shapes."""
    found: dict = {}
    rpn = state.get("rpn.head.cls_logits.weight")
    if rpn is not None:
        found["anchors.per_location"] = int(rpn.shape[0])
    if saved is not None:
        for key in ("backbone.name", *FROM_CHECKPOINT, "roi.pool_size"):
            value = _lookup(saved, key)
            if key.startswith("mask.") and not _lookup(saved, "mask.enabled"):
                continue
            if isinstance(value, (int, list, str)) and not isinstance(value, bool) and value != "auto":
                found[key] = value
        return found
    fpn = state.get("backbone.fpn.inner_blocks.0.0.weight", state.get("backbone.fpn.inner_blocks.0.weight"))
    fc6 = state.get("roi_heads.box_head.fc6.weight")
    if fpn is not None:
        found["backbone.fpn_channels"] = int(fpn.shape[0])
    if fc6 is not None:
        found["roi.representation_size"] = int(fc6.shape[0])
        if fpn is not None:
            found["roi.pool_size"] = int(round(math.sqrt(fc6.shape[1] / fpn.shape[0])))
    convs = [k for k in state if k.startswith("roi_heads.mask_head.") and k.endswith(".0.weight")]
    if convs:
        found["mask.num_convs"], found["mask.conv_channels"] = len(convs), int(state[convs[0]].shape[0])
    if found.get("anchors.per_location") == aspect_ratios:
        found["anchors.sizes"] = TORCHVISION_ANCHORS
    return found


def settings_from_checkpoint(cfg: Config, train_set, say: Callable[[str], None]) -> dict:
    """The `auto` architecture settings resolved from `model.init_from` (dotted `model.` keys);
    logs them, every set value that contradicts the checkpoint, and a better anchor fit."""
    path = Path(cfg.model.init_from)
    saved, state = read_checkpoint(path)
    model = cfg.model
    theirs = architecture(saved, state, len(model.anchors.aspect_ratios))
    if model.anchors.sizes == "auto" and len(theirs.get("anchors.sizes", [])) != model.num_levels:
        theirs.pop("anchors.sizes", None)  # another backbone's levels: the contradiction below names it
    wanted = [key for key in FROM_CHECKPOINT if model.mask.enabled or not key.startswith("mask.")]
    updates = {f"model.{key}": theirs[key] for key in wanted if key in theirs and model.setting(key) == "auto"}
    what = ("its resolved config" if saved is not None else
            "read from its tensors' shapes, a torchvision state dict; anchors: torchvision's defaults")
    if updates:
        say(f"[init_from] {', '.join(f'{k}: {v}' for k, v in updates.items())}: the checkpoint's ({what}), "
            f"in place of `auto`, so that its tensors load")
        head_rule_note(updates, train_set.num_classes, state, say)
    resolved = cfg.with_settings(updates).model if updates else model
    for key, cost in contradictions(resolved, theirs, state):
        say(f"[init_from] WARNING {cost}")
    if "model.anchors.sizes" in updates:
        anchor_note(cfg, train_set, updates["model.anchors.sizes"], say)
    return updates


def contradictions(model, theirs: dict, state: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(key, message) for every setting of `model` that differs from the checkpoint's."""
    ours = {key: model.setting(key) for key in theirs if key != "anchors.per_location" and
            (model.mask.enabled or not key.startswith("mask."))}
    if "anchors.per_location" in theirs:
        sizes = model.anchors.sizes
        ours["anchors.per_location"] = (1 if sizes == "auto" else len(sizes[0])) * len(model.anchors.aspect_ratios)
    found = []
    for key, value in ours.items():
        if value == "auto" or value == theirs[key]:
            continue
        shown = ("model.anchors.sizes x aspect_ratios (anchors per position)" if key == "anchors.per_location"
                 else f"model.{key}")
        if COSTS.get(key) is None:
            cost = "no tensor fails to load, but the heads were trained with the checkpoint's value"
        else:
            share = _share(state, COSTS[key])
            cost = (f"{', '.join(p.rstrip('.') for p in COSTS[key])} ({_percent(share)} of the checkpoint's "
                    f"weights) cannot load and start from their init")
        fix = "leave it at auto or set" if key in FROM_CHECKPOINT else "set"
        found.append((key, f"{shown}={value} contradicts the checkpoint's {theirs[key]}: {cost}; {fix} the "
                           f"checkpoint's value to keep them"))
    return found


def head_rule_note(updates: dict, num_classes: int, state: dict[str, torch.Tensor],
                   say: Callable[[str], None]) -> None:
    """Say when the class-count rule (head_size.py) would size the head otherwise than the checkpoint."""
    rule = head_for(num_classes)
    keys = {"model.backbone.fpn_channels": "fpn_channels", "model.roi.representation_size": "representation_size"}
    other = {key: rule[name] for key, name in keys.items() if key in updates and updates[key] != rule[name]}
    if other:
        share = _share(state, COSTS["backbone.fpn_channels"] + COSTS["roi.representation_size"])
        say(f"[init_from] for {num_classes} classes `auto` alone would size the head "
            f"{', '.join(f'{k}={v}' for k, v in other.items())} (data/head_size.py); the checkpoint's is kept so "
            f"that it loads. Setting those values gives up its FPN, RPN and box head ({_percent(share)} of its "
            f"weights).")


def anchor_note(cfg: Config, train_set, sizes: list, say: Callable[[str], None]) -> None:
    """Warn when octave sizes fitted to the training boxes would reach clearly more of them than the
    checkpoint's anchors (which its RPN was trained for)."""
    model = cfg.model
    strides, ratios = fpn_strides(model.backbone.name), model.anchors.aspect_ratios
    try:
        fitted, reach = fit_anchor_sizes(train_set.records, levels=model.num_levels, aspect_ratios=ratios,
                                         strides=strides, min_size=cfg.data.test_min_size,
                                         max_size=cfg.data.max_size, fg_iou_thresh=model.rpn.fg_iou_thresh,
                                         seed=cfg.seed)
    except ValueError:  # no boxes to fit to
        return
    shaped = resized_boxes(sample_records(train_set.records, 300, cfg.seed), cfg.data.test_min_size, cfg.data.max_size)
    kept = float((best_anchor_ious(shaped, sizes, ratios, strides) >= 0.5).float().mean())
    if fitted != sizes and reach["above_0.5"] > kept + ANCHOR_GAIN_WORTH_A_WARNING:
        say(f"[init_from] WARNING the checkpoint's anchors give {100 * kept:.0f}% of the training boxes an anchor "
            f"with IoU >= 0.5; sizes fitted to this data would give {100 * reach['above_0.5']:.0f}% "
            f"(model.anchors.sizes={fitted}: the RPN head still loads, but was trained for the checkpoint's)")


def _lookup(saved: dict, dotted: str):
    value = saved
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _percent(share: float) -> str:
    return f"{100 * share:.1f}%" if share >= 0.001 else "<0.1%"


def _share(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> float:
    total = sum(v.numel() for v in state.values() if v.is_floating_point())
    part = sum(v.numel() for k, v in state.items() if k.startswith(prefixes) and v.is_floating_point())
    return part / max(total, 1)
