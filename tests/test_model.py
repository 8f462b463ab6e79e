"""Model: initial loss values, normalization invariances, torchvision parity, learning."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from conftest import TORCHVISION_SIZES, tiny_config
from rcnn_trainer.losses.weighting import LossWeights, Ramp, TermWeight
from rcnn_trainer.model.build import build_loss_weights, build_model

EXHAUSTIVE = {"rpn": {"batch_size_per_image": 100000, "positive_fraction": 1.0},
              "roi": {"batch_size_per_image": 100000, "positive_fraction": 1.0}}


def scene(num_boxes: int, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, size, size, generator=g)
    xy = torch.rand(num_boxes, 2, generator=g) * (size - 20)
    wh = torch.rand(num_boxes, 2, generator=g) * 12 + 6
    target = {"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 5, (num_boxes,), generator=g)}
    return image, target


def losses_of(model, images, targets):
    torch.manual_seed(0)
    losses, stats = model(images, targets)
    return {k: float(v.detach()) for k, v in losses.items()}, stats


def test_initial_losses_near_theory(tmp_path):
    model = build_model(tiny_config(tmp_path).model).train()
    images, targets = zip(*[scene(5, seed=s) for s in range(4)])
    losses, _ = losses_of(model, list(images), list(targets))
    assert losses["loss_rpn_cls"] == pytest.approx(math.log(2), abs=0.02)
    assert losses["loss_roi_cls"] == pytest.approx(math.log(4 + 1), abs=0.05)
    assert 0 <= losses["loss_rpn_box"] < 1.0 and 0 <= losses["loss_roi_box"] < 1.0


@pytest.mark.parametrize("repeat", [2, 4])
def test_repeating_images_leaves_losses_unchanged(tmp_path, repeat):
    model = build_model(tiny_config(tmp_path, model=EXHAUSTIVE).model).train()
    image, target = scene(3)
    one, stats_one = losses_of(model, [image], [target])
    many, stats_many = losses_of(model, [image] * repeat, [target] * repeat)
    for name in one:
        assert many[name] == pytest.approx(one[name], rel=1e-4, abs=1e-6), name
    assert float(stats_many["avg_factor/rpn_cls"]) == repeat * float(stats_one["avg_factor/rpn_cls"])


def test_loss_does_not_scale_with_number_of_boxes(tmp_path):
    model = build_model(tiny_config(tmp_path).model).train()
    few, _ = losses_of(model, [scene(1, seed=1)[0]], [scene(1, seed=1)[1]])
    lots, _ = losses_of(model, [scene(50, seed=1)[0]], [scene(50, seed=1)[1]])
    for name in ("loss_rpn_cls", "loss_roi_cls"):
        assert 0.5 < lots[name] / few[name] < 2.0, (name, few, lots)
    assert sum(lots.values()) < 3 * sum(few.values())  # not 50x


def test_empty_and_tiny_targets_train(tmp_path):
    model = build_model(tiny_config(tmp_path).model).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    tiny = {"boxes": torch.tensor([[10.0, 10.0, 11.0, 11.5], [30.0, 30.0, 30.5, 31.0]]),
            "labels": torch.tensor([1, 2])}
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    for targets in ([empty, empty], [tiny, tiny], [empty, tiny]):
        losses, _ = model(images, targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()


@pytest.mark.parametrize("reference_class", [FasterRCNN, MaskRCNN])
def test_parity_with_torchvision(tmp_path, reference_class):
    """A torchvision FasterRCNN / MaskRCNN state dict loads as it is (same keys, no conversion)
    and gives the same detections (and masks) at equal settings."""
    torch.manual_seed(0)
    tv_backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    reference = reference_class(tv_backbone, num_classes=5, min_size=96, max_size=128, box_score_thresh=0.0).eval()
    masks = reference_class is MaskRCNN
    cfg = tiny_config(tmp_path, model={**TORCHVISION_SIZES,
                                       "mask": {"enabled": masks, "num_convs": 4, "conv_channels": 256}})
    ours = build_model(cfg.model).eval()
    ours.load_state_dict(reference.state_dict())
    images = [torch.rand(3, 96, 128), torch.rand(3, 96, 128)]
    with torch.no_grad():
        expected, got = reference(images), ours(images)
    for e, g in zip(expected, got):
        assert len(e["boxes"]) > 0 and len(e["boxes"]) == len(g["boxes"])
        assert torch.allclose(e["boxes"], g["boxes"], atol=1e-3)
        assert torch.allclose(e["scores"], g["scores"], atol=1e-5)
        assert torch.equal(e["labels"], g["labels"])
        assert ("masks" in g) == masks
        if masks:
            assert e["masks"].shape == g["masks"].shape and (e["masks"] - g["masks"]).abs().max() < 1e-3


def test_learns_a_handful_of_images(tmp_path):
    """A few hundred steps on 2 images: losses fall and each object is found with its class."""
    torch.manual_seed(0)
    cfg = tiny_config(tmp_path, model={"roi": {"representation_size": 64}})
    model = build_model(cfg.model).train()
    images, targets = zip(*[scene(2, seed=s) for s in (5, 6)])
    images, targets = list(images), list(targets)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    first = None
    for step in range(120):
        losses, _ = model(images, targets)
        total = sum(losses.values())
        first = first if first is not None else float(total.detach())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert float(total.detach()) < 0.3 * first
    model.eval()
    with torch.no_grad():
        detections = model(images)
    from torchvision.ops import box_iou
    for det, target in zip(detections, targets):
        for box, label in zip(target["boxes"], target["labels"]):
            iou = box_iou(box[None], det["boxes"])[0]
            hits = (iou > 0.5) & (det["labels"] == label) & (det["scores"] > 0.5)
            assert hits.any(), (box, label, det)


def test_build_loss_weights_reads_each_term(tmp_path):
    cfg = tiny_config(tmp_path, model={
        "rpn": {"cls_loss": {"weight": 0.5}, "box_loss": {"weight": 2.0}},
        "roi": {"cls_loss": {"weight": 1.5}, "box_loss": {"weight": 3.0, "weight_ramp": {"start": 1.0, "iters": 4}}},
        "mask": {"enabled": True, "loss": {"weight": 0.25, "weight_ramp": {"start": 0.0, "iters": 2, "shape": "cosine"}}}})
    weights = build_loss_weights(cfg.model)
    assert weights == LossWeights({"loss_rpn_cls": TermWeight(0.5), "loss_rpn_box": TermWeight(2.0),
                                   "loss_roi_cls": TermWeight(1.5), "loss_roi_box": TermWeight(3.0, Ramp(1.0, 4)),
                                   "loss_roi_mask": TermWeight(0.25, Ramp(0.0, 2, "cosine"))})
    assert weights.at(0) == {"loss_rpn_cls": 0.5, "loss_rpn_box": 2.0, "loss_roi_cls": 1.5, "loss_roi_box": 1.0,
                             "loss_roi_mask": 0.0}
    assert weights.at(1)["loss_roi_box"] == 1.5 and weights.at(1)["loss_roi_mask"] == pytest.approx(0.125)
    assert weights.at(10) == weights.final() == {"loss_rpn_cls": 0.5, "loss_rpn_box": 2.0, "loss_roi_cls": 1.5,
                                                 "loss_roi_box": 3.0, "loss_roi_mask": 0.25}
    assert "loss_roi_mask" not in build_loss_weights(tiny_config(tmp_path).model).final()  # masks off: no term
    with pytest.raises(ValueError, match="loss_roi_bbox"):
        LossWeights({"loss_roi_bbox": TermWeight(1.0)})

