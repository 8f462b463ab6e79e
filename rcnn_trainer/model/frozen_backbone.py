"""The backbone + FPN frozen for fp32 inference on CPU (rcnn-eval, rcnn-predict).

TorchScript's `freeze` + `optimize_for_inference` fold every BatchNorm into its convolution
and fuse convolution, add and ReLU through oneDNN. Measured here (resnet18-FPN, 128 px, 2
threads, trained weights): 13.6 -> 12.3 ms per image at batch 1, 61.7 -> 52.5 ms per batch
of 8, outputs within 2e-5 of the eager module. torch.compile saved nothing on this CPU
(docs/benchmarks.md), hence TorchScript. Not under autocast (a frozen graph keeps the dtype
it was frozen in) and not for training or export: a copy of the weights, frozen once.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class FrozenBackbone(nn.Module):
    """An eager shell around the frozen graph: keeps `out_channels`, takes forward hooks."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.out_channels = backbone.out_channels
        with warnings.catch_warnings():  # TorchScript's deprecation notices
            warnings.simplefilter("ignore")
            self.graph = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(backbone.eval())))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.graph(images)


def freeze_backbone(model: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None, say=print) -> bool:
    """Swap `model.backbone` for its frozen graph where that pays (CPU, fp32); True if done.
    A backbone TorchScript cannot compile stays eager, and the log says why."""
    if device.type != "cpu" or autocast_dtype is not None:
        return False
    try:
        model.backbone = FrozenBackbone(model.backbone)
    except (RuntimeError, torch.jit.frontend.FrontendError) as err:
        say(f"[inference] backbone left eager: TorchScript could not freeze it ({str(err).splitlines()[0][:200]})")
        return False
    return True
