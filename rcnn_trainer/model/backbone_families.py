"""The stronger torchvision backbones behind `model.backbone.name`: ResNeXt, RegNet, ConvNeXt, Swin.

Each family is described by where its four stages (strides 4, 8, 16, 32) live in torchvision's
classifier and which modules make up each stage; the FPN reads the last block of every stage,
as detectron2 and MMDetection do (ResNeXt: layer1-4; RegNet: trunk_output.block1-4; ConvNeXt
and Swin: features 1/3/5/7, the stages between the downsampling layers). The stages are
torchvision's own modules, read by its IntermediateLayerGetter, so the state-dict keys stay
torchvision's (`backbone.body.<module>.*`) and the body stays scriptable.

Normalization: ResNeXt and RegNet are built with `model.backbone.norm`'s BatchNorm
(frozen / trainable / GroupNorm); ConvNeXt and Swin normalize with LayerNorm, which has no
running statistics to freeze, so `norm` does not apply to them and their LayerNorms train
with the stages they belong to (`trainable_layers`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

# stage modules, top (stride 32) first, as `trainable_layers` counts; the stem last
RESNET_STAGES = [["layer4"], ["layer3"], ["layer2"], ["layer1"], ["conv1", "bn1"]]
REGNET_STAGES = [["block4"], ["block3"], ["block2"], ["block1"], ["stem"]]
# ConvNeXt / Swin `features`: 0 stem (patch embedding), 1 stage 1, 2 downsample, 3 stage 2, ...
FEATURES_STAGES = [["6", "7"], ["4", "5"], ["2", "3"], ["1"], ["0"]]
RETURN_LAYERS = {
    "resnet": {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
    "regnet": {"block1": "0", "block2": "1", "block3": "2", "block4": "3"},
    "features": {"1": "0", "3": "1", "5": "2", "7": "3"},
}
LAYERNORM_PREFIXES = ("convnext", "swin")
ALL_STAGES = len(RESNET_STAGES)  # trainable_layers at or above this: the whole body trains


def family(name: str) -> str:
    """resnet (resnet*, resnext*), regnet, features (convnext*, swin*) or mobilenet."""
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return "resnet"
    if name.startswith("regnet"):
        return "regnet"
    if name.startswith(LAYERNORM_PREFIXES):
        return "features"
    return "mobilenet"


def uses_layernorm(name: str) -> bool:
    return name.startswith(LAYERNORM_PREFIXES)


def norm_note(name: str, norm: str) -> str | None:
    """The log line for a LayerNorm backbone: `model.backbone.norm` does not reach it."""
    if not uses_layernorm(name):
        return None
    return (f"[backbone] {name} normalizes with LayerNorm: model.backbone.norm ({norm}) applies to BatchNorm only "
            f"(frozen BN does not apply to LayerNorm, which keeps no running statistics); its LayerNorms train "
            f"with the stages model.backbone.trainable_layers leaves trainable")


def build_classifier(name: str, norm_layer: Callable[[int], nn.Module]) -> nn.Module:
    """torchvision's classifier `name`, random init; BatchNorm families with `norm_layer`."""
    if uses_layernorm(name):
        return getattr(torchvision.models, name)(weights=None)
    return getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)


def stage_body(name: str, classifier: nn.Module) -> tuple[nn.Module, dict[str, str], list[list[str]]]:
    """(the module the FPN reads, its return layers, the stage groups top first)."""
    kind = family(name)
    if kind == "resnet":
        return classifier, RETURN_LAYERS["resnet"], RESNET_STAGES
    if kind == "regnet":  # flattened so that IntermediateLayerGetter sees the four blocks as children
        trunk = classifier.trunk_output
        body = nn.Sequential(OrderedDict([("stem", classifier.stem)] +
                                         [(block, getattr(trunk, block)) for block in RETURN_LAYERS["regnet"]]))
        return body, RETURN_LAYERS["regnet"], REGNET_STAGES
    return classifier.features, RETURN_LAYERS["features"], FEATURES_STAGES


def freeze_stages(body: nn.Module, stages: list[list[str]], trainable_layers: int) -> None:
    """Leave the top `trainable_layers` stage groups trainable, freeze the rest of `body`."""
    trainable = tuple(f"{module}." for group in stages[:trainable_layers] for module in group)
    for param_name, param in body.named_parameters():
        if not param_name.startswith(trainable):
            param.requires_grad_(False)


class ChannelsFirstLayerGetter(IntermediateLayerGetter):
    """IntermediateLayerGetter for Swin, whose stages work on [N, H, W, C]: returns [N, C, H, W]
    for the FPN. (The forward is written out because TorchScript does not compile super() calls.)"""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x.permute(0, 3, 1, 2)
        return out


@torch.no_grad()
def stage_channels(body: nn.Module) -> list[int]:
    """Channels of the returned stages, read from one tiny forward (eval mode: BatchNorm statistics
    untouched) rather than from each family's constructor arguments."""
    was_training = body.training
    outputs = body.eval()(torch.zeros(1, 3, 64, 64))
    body.train(was_training)
    return [int(v.shape[1]) for v in outputs.values()]
