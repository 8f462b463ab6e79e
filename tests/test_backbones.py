"""The ResNeXt, RegNetY, ConvNeXt and Swin backbones: FPN levels, local and ImageNet weights,
stage freezing, norms, and one of them through rcnn-predict and rcnn-export."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from conftest import tiny_config, write_yaml
from rcnn_trainer.cli import export_main
from rcnn_trainer.config_loader import config_to_dict
from rcnn_trainer.errors import UserError
from rcnn_trainer.model.backbone import build_backbone
from rcnn_trainer.model.backbone_families import norm_note
from rcnn_trainer.model.build import build_model
from rcnn_trainer.model.frozen_backbone import freeze_backbone
from rcnn_trainer.model.imagenet_weights import imagenet_state_dict
from rcnn_trainer.runtime.checkpoint import write_checkpoint

NEW = ["resnext50_32x4d", "regnet_y_800mf", "convnext_tiny", "swin_t"]
# the body's top-level modules that trainable_layers=2 leaves trainable (the two top stages)
TOP_TWO = {"resnext50_32x4d": {"layer3", "layer4"}, "regnet_y_800mf": {"block3", "block4"},
           "convnext_tiny": {"4", "5", "6", "7"}, "swin_t": {"4", "5", "6", "7"}}


def classifier_file(name: str, path) -> dict:
    """A state dict of torchvision's classifier `name` (random values, as ImageNet's would be: a file)."""
    try:  # shapes without running the init (seconds for ConvNeXt / Swin)
        with torch.device("meta"):
            shapes = getattr(torchvision.models, name)().state_dict()
    except NotImplementedError:  # RegNet computes its widths with real tensors
        shapes = getattr(torchvision.models, name)().state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.rand(v.shape, generator=generator) + 0.5 if v.is_floating_point() else
             torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name, norm", [("resnext50_32x4d", "frozen_bn"), ("regnet_y_800mf", "frozen_bn"),
                                        ("convnext_tiny", "gn"), ("swin_t", "frozen_bn")])
def test_new_backbone_loads_a_local_file_freezes_its_stages_and_gives_fpn_levels(name, norm, tmp_path):
    state = classifier_file(name, tmp_path / "classifier.pth")
    backbone = build_backbone(name, weights=str(tmp_path / "classifier.pth"), trainable_layers=2,
                              norm=norm, fpn_channels=16)
    body = backbone.body.state_dict()
    for key, value in body.items():  # every body tensor is the file's
        theirs = {"resnext50_32x4d": key, "regnet_y_800mf": key if key.startswith("stem.") else f"trunk_output.{key}",
                  "convnext_tiny": f"features.{key}", "swin_t": f"features.{key}"}[name]
        assert torch.equal(value, state[theirs]), key
    trainable = {n.split(".")[0] for n, p in backbone.body.named_parameters() if p.requires_grad}
    assert trainable == TOP_TWO[name]
    norms = {type(m) for m in backbone.body.modules()}
    if name.startswith(("convnext", "swin")):  # LayerNorm left as it is (even with gn), trained with its stage
        assert not norms & {FrozenBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm}
        assert any(p.requires_grad for m in backbone.body.modules() if isinstance(m, nn.LayerNorm)
                   for p in m.parameters())
    else:
        assert FrozenBatchNorm2d in norms and nn.BatchNorm2d not in norms

    out = backbone(torch.rand(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {  # strides 4, 8, 16, 32 and the pooled 64
        "0": (2, 16, 16, 16), "1": (2, 16, 8, 8), "2": (2, 16, 4, 4), "3": (2, 16, 2, 2), "pool": (2, 16, 1, 1)}
    sum(v.sum() for v in out.values()).backward()
    for param_name, param in backbone.body.named_parameters():
        assert (param.grad is not None) == param.requires_grad, param_name
    if name == "swin_t":  # its own layer getter (channels-last stages): through the frozen TorchScript graph too
        holder = nn.Module()
        holder.backbone = backbone.eval()
        image = torch.rand(1, 3, 64, 96)
        with torch.no_grad():
            eager = backbone(image)
        assert freeze_backbone(holder, torch.device("cpu"), None, say=print)
        with torch.no_grad():
            frozen = holder.backbone(image)
        for key, value in eager.items():  # float32 reassociation only (the file's weights make large activations)
            assert (frozen[key] - value).abs().max() <= 1e-4 * value.abs().max(), key


def test_imagenet_weights_are_each_models_hashed_torchvision_file(tmp_path, monkeypatch):
    """`weights: imagenet` reads $TORCH_HOME/hub/checkpoints/<torchvision's file name>, and only
    after its sha256 matches the hash in that name: a foreign file there is refused, unread."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    files = {"resnext50_32x4d": "resnext50_32x4d-1a0047aa.pth", "regnet_y_800mf": "regnet_y_800mf-58fc7688.pth",
             "convnext_tiny": "convnext_tiny-983f1562.pth", "swin_t": "swin_t-704ceda3.pth"}
    for name, file_name in files.items():
        (cache / file_name).write_bytes(b"not torchvision's file")
        with pytest.raises(UserError, match=f"{file_name}' does not match the hash torchvision publishes"):
            imagenet_state_dict(name)


def test_layernorm_backbones_say_that_norm_does_not_reach_them():
    assert "LayerNorm" in norm_note("convnext_tiny", "frozen_bn") and "frozen BN does not apply" in \
        norm_note("swin_t", "bn")
    assert norm_note("resnext50_32x4d", "frozen_bn") is None and norm_note("regnet_y_800mf", "bn") is None


def test_regnet_checkpoint_exports(tmp_path, capsys):
    """The cheapest new backbone through rcnn-export (TorchScript, checked against the eager model on a
    validation image), from a checkpoint of the built model. (A training run and rcnn-predict cost ~15 s more
    here, TorchScript-freezing the backbone most of it; training steps are the forward/backward above, the
    frozen backbone is checked with Swin above.)"""
    cfg = tiny_config(tmp_path, model={"backbone": {"name": "regnet_y_800mf"}})
    config = write_yaml(tmp_path / "c.yaml", config_to_dict(cfg))
    checkpoint = tmp_path / "model.pth"
    write_checkpoint({"model": build_model(cfg.model).state_dict(), "config": config_to_dict(cfg), "iteration": 0},
                     checkpoint)
    out = tmp_path / "model.torchscript"
    assert export_main(["--config", str(config), "--checkpoint", str(checkpoint), "--format", "torchscript",
                        "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"checked on one validation image \(64, 64\) against the eager model: [1-9]\d* detections",
                     printed)  # the file, loaded back by torch.jit.load, gives the eager model's detections
    assert "labels equal" in printed and "does NOT match" not in printed


def test_a_file_of_another_variant_is_refused_naming_the_tensor(tmp_path):
    torch.save(torchvision.models.regnet_y_400mf().state_dict(), tmp_path / "400mf.pth")
    with pytest.raises(UserError, match=r"does not fit a torchvision regnet_y_800mf: size mismatch for trunk_output"):
        build_backbone("regnet_y_800mf", weights=str(tmp_path / "400mf.pth"), trainable_layers=3, norm="frozen_bn",
                       fpn_channels=8)
