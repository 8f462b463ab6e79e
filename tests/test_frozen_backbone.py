"""The frozen backbone of CPU inference (rcnn-eval, rcnn-predict) against the eager model."""

import copy

import pytest
import torch

from conftest import tiny_config
from rcnn_trainer.model.build import build_model
from rcnn_trainer.model.frozen_backbone import FrozenBackbone, freeze_backbone


def _trained_looking_model(tmp_path, name="resnet18", norm="bn"):
    torch.manual_seed(0)
    three_levels = {"anchors": {"sizes": [[16], [32], [64]]}} if name.startswith("mobilenet") else {}
    model = build_model(tiny_config(tmp_path, model={"backbone": {"name": name, "norm": norm}, **three_levels}).model)
    model.train()
    with torch.no_grad():  # BatchNorm statistics away from their init, so the folding matters
        for _ in range(3):
            model.backbone(torch.rand(2, 3, 64, 64) * 3)
    return model.eval()


def test_frozen_backbone_gives_the_eager_detections(tmp_path):
    eager = _trained_looking_model(tmp_path)
    frozen = copy.deepcopy(eager)
    assert freeze_backbone(frozen, torch.device("cpu"), None)
    assert isinstance(frozen.backbone, FrozenBackbone)
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():
        features = eager.backbone(torch.stack(images)), frozen.backbone(torch.stack(images))
        for name in features[0]:
            torch.testing.assert_close(features[1][name], features[0][name], rtol=1e-4, atol=1e-4)
        expected, actual = eager(images), frozen(images)
    for e, a in zip(expected, actual):
        assert len(e["boxes"]) > 0 and torch.equal(e["labels"], a["labels"])
        torch.testing.assert_close(a["boxes"], e["boxes"], rtol=1e-3, atol=1e-2)
        torch.testing.assert_close(a["scores"], e["scores"], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name,norm", [("resnet50", "frozen_bn"), ("mobilenet_v3_large", "bn"), ("resnet34", "gn")])
def test_every_backbone_freezes_to_the_same_features(tmp_path, name, norm):
    eager = _trained_looking_model(tmp_path, name, norm)
    frozen = copy.deepcopy(eager)
    assert freeze_backbone(frozen, torch.device("cpu"), None)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = eager.backbone(x), frozen.backbone(x)
    for level in expected:
        torch.testing.assert_close(actual[level], expected[level], rtol=1e-4, atol=1e-4 * expected[level].abs().max().item())


def test_backbone_stays_eager_under_autocast_or_off_cpu(tmp_path):
    model = _trained_looking_model(tmp_path)
    assert not freeze_backbone(model, torch.device("cpu"), torch.bfloat16)
    assert not freeze_backbone(model, torch.device("cuda"), None)
    assert not isinstance(model.backbone, FrozenBackbone)
