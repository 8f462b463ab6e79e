"""Backbone + FPN from torchvision parts.

Returns torchvision's BackboneWithFPN, so state-dict keys (`backbone.body.*`,
`backbone.fpn.*`) match torchvision's FasterRCNN. Feature maps are named "0".."3" + "pool"
for resnets (strides 4..64) and "0", "1" + "pool" for mobilenet_v3_large.
We build the extractor here instead of calling torchvision's `_resnet_fpn_extractor`
because that one fixes the FPN width at 256; a narrow FPN is what makes CPU training fast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from rcnn_trainer.errors import UserError
from rcnn_trainer.safe_load import load_weights_only
from rcnn_trainer.model.imagenet_weights import imagenet_state_dict

RESNET_STAGES = ["layer4", "layer3", "layer2", "layer1", "conv1"]  # top first, as trainable_layers counts


def norm_layer_for(norm: str) -> Callable[[int], nn.Module]:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm in ("bn", "syncbn"):  # syncbn: converted with SyncBatchNorm.convert_sync_batchnorm under DDP
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda channels: nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"unknown norm '{norm}' (frozen_bn | bn | gn | syncbn)")


def build_backbone(name: str, *, weights: Optional[str], trainable_layers: int, norm: str,
                   fpn_channels: int, trained_later: bool = False) -> BackboneWithFPN:
    """`trained_later`: trained weights arrive after building (model.init_from), so
    `trainable_layers` applies as it does with `weights`."""
    norm_layer = norm_layer_for(norm)
    classifier = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
    if weights is not None:
        _load_classifier_weights(classifier, name, weights, norm)
    elif not trained_later:
        trainable_layers = 6 if name.startswith("mobilenet") else 5  # nothing to keep frozen
    if name.startswith("resnet"):
        return _resnet_fpn(classifier, trainable_layers, fpn_channels)
    return _mobilenet_fpn(classifier, trainable_layers, fpn_channels)


def _load_classifier_weights(classifier: nn.Module, name: str, weights: str, norm: str) -> None:
    if norm == "gn":
        raise UserError(f"model.backbone.weights '{weights}' holds BatchNorm statistics that GroupNorm "
                        f"cannot use; set model.backbone.norm to frozen_bn or bn with pretrained weights.")
    if weights == "imagenet":  # torchvision's cache, hash-checked (imagenet_weights.py); never in tests' default runs
        state = imagenet_state_dict(name)
        source = f"torchvision {name} ImageNet weights"
    else:
        state = load_weights_only(Path(weights), what="model.backbone.weights")
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        source = f"'{weights}'"
    missing, unexpected = classifier.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing or len(unexpected) == len(state):
        raise UserError(f"model.backbone.weights: {source} does not fit a torchvision {name}: "
                        f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                        f"(e.g. {list(unexpected)[:3]}). Save `torchvision.models.{name}().state_dict()`.")


def _freeze_all_but(module_names: list[str], model: nn.Module) -> None:
    for param_name, param in model.named_parameters():
        if not any(param_name.startswith(prefix) for prefix in module_names):
            param.requires_grad_(False)


def _resnet_fpn(resnet: nn.Module, trainable_layers: int, fpn_channels: int) -> BackboneWithFPN:
    trainable = RESNET_STAGES[:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    _freeze_all_but(trainable, resnet)
    in_channels_stage2 = resnet.inplanes // 8
    return BackboneWithFPN(
        resnet, return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[in_channels_stage2 * 2 ** i for i in range(4)],
        out_channels=fpn_channels, extra_blocks=LastLevelMaxPool())


def _mobilenet_fpn(mobilenet: nn.Module, trainable_layers: int, fpn_channels: int) -> BackboneWithFPN:
    features = mobilenet.features
    # stage starts: the first layer, every block that reduces resolution, and the last layer
    stages = [0] + [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)] + [len(features) - 1]
    num_stages = len(stages)
    freeze_before = len(features) if trainable_layers == 0 else stages[num_stages - trainable_layers]
    for block in features[:freeze_before]:
        block.requires_grad_(False)
    returned = [num_stages - 2, num_stages - 1]
    return_layers = {f"{stages[k]}": str(v) for v, k in enumerate(returned)}
    in_channels_list = [features[stages[k]].out_channels for k in returned]
    return BackboneWithFPN(features, return_layers=return_layers, in_channels_list=in_channels_list,
                           out_channels=fpn_channels, extra_blocks=LastLevelMaxPool())
