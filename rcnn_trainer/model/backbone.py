"""Backbone + FPN from torchvision parts.

Returns torchvision's BackboneWithFPN, so state-dict keys (`backbone.body.*`,
`backbone.fpn.*`) match torchvision's FasterRCNN. Feature maps are named "0".."3" + "pool"
(strides 4..64) for ResNet, ResNeXt, RegNet, ConvNeXt and Swin (their stages: backbone_families.py)
and "0", "1" + "pool" for mobilenet_v3_large.
We build the extractor here instead of calling torchvision's `_resnet_fpn_extractor`
because that one fixes the FPN width at 256; a narrow FPN is what makes CPU training fast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from rcnn_trainer.errors import UserError
from rcnn_trainer.safe_load import load_weights_only
from rcnn_trainer.model import backbone_families as families
from rcnn_trainer.model.imagenet_weights import imagenet_state_dict

CLASSIFIER_ONLY = ("fc.", "classifier.", "head.", "norm.")  # the classifiers' heads (Swin: its last norm): unused


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
    classifier = families.build_classifier(name, norm_layer_for(norm))
    if weights is not None:
        _load_classifier_weights(classifier, name, weights, norm)
    elif not trained_later:
        trainable_layers = 6  # nothing to keep frozen
    if families.family(name) == "mobilenet":
        return _mobilenet_fpn(classifier, trainable_layers, fpn_channels)
    return _stages_fpn(name, classifier, trainable_layers, fpn_channels)


def _load_classifier_weights(classifier: nn.Module, name: str, weights: str, norm: str) -> None:
    if norm == "gn" and not families.uses_layernorm(name):
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
    try:
        missing, unexpected = classifier.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same names, other shapes: another variant of the family
        raise UserError(f"model.backbone.weights: {source} does not fit a torchvision {name}: "
                        f"{(str(err).splitlines()[1:] or [str(err)])[0].strip()[:300]}") from None
    missing = [k for k in missing if not k.startswith(CLASSIFIER_ONLY)]
    unexpected = [k for k in unexpected if not k.startswith(CLASSIFIER_ONLY)]  # e.g. a deeper variant's blocks
    if missing or unexpected:
        raise UserError(f"model.backbone.weights: {source} does not fit a torchvision {name}: "
                        f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                        f"(e.g. {list(unexpected)[:3]}). Save `torchvision.models.{name}().state_dict()`.")


def _stages_fpn(name: str, classifier: nn.Module, trainable_layers: int, fpn_channels: int) -> BackboneWithFPN:
    """The FPN on the four stages of a ResNet / ResNeXt / RegNet / ConvNeXt / Swin."""
    body, return_layers, stages = families.stage_body(name, classifier)
    families.freeze_stages(body, stages, trainable_layers)
    getter_class = families.ChannelsFirstLayerGetter if name.startswith("swin") else IntermediateLayerGetter
    getter = getter_class(body, return_layers=return_layers)
    backbone = BackboneWithFPN(body, return_layers=return_layers, in_channels_list=families.stage_channels(getter),
                               out_channels=fpn_channels, extra_blocks=LastLevelMaxPool())
    backbone.body = getter  # the same modules (same keys); Swin's returns channels-first maps
    return backbone


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
