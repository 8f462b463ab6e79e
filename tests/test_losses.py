"""Losses: values against torchvision.ops and hand computations, one contract for all."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss, sigmoid_focal_loss

from rcnn_trainer.losses.box import box_loss_per_box
from rcnn_trainer.losses.classification import class_loss_per_roi, objectness_loss_per_anchor
from rcnn_trainer.losses.heads import loss_roi_box, loss_roi_cls, loss_rpn_box, loss_rpn_cls
from rcnn_trainer.losses.reduce import avg_factor_from_count
from rcnn_trainer.losses.settings import BoxLoss, ClsLoss

CODER = BoxCoder((10.0, 10.0, 5.0, 5.0))


def random_boxes(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 50
    wh = torch.rand(n, 2, generator=generator) * 30 + 2
    return torch.cat([xy, xy + wh], dim=1)


def test_bce_with_pos_weight_hand_computed():
    logits = torch.tensor([0.0, 2.0, -1.0])
    labels = torch.tensor([1.0, 0.0, 1.0])
    got = objectness_loss_per_anchor(logits, labels, loss_type="bce", pos_weight=3.0)
    sig = lambda x: 1 / (1 + math.exp(-x))
    want = [3 * -math.log(0.5), -math.log(1 - sig(2.0)), 3 * -math.log(sig(-1.0))]
    assert got.tolist() == pytest.approx(want, rel=1e-6)


def test_ce_with_class_weights_hand_computed():
    logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    labels = torch.tensor([0, 1])
    got = class_loss_per_roi(logits, labels, loss_type="ce", pos_weight=2.0)
    p = math.exp(2.0) / (math.exp(1.0) + math.exp(2.0) + 1.0)
    assert got.tolist() == pytest.approx([math.log(3.0), 2.0 * -math.log(p)], rel=1e-6)
    z = logits.clone().requires_grad_(True)
    class_loss_per_roi(z, labels, loss_type="ce", pos_weight=2.0).sum().backward()
    want = torch.tensor([[1.0], [2.0]]) * (torch.softmax(logits, 1) - F.one_hot(labels, 3))  # w_y (p - onehot)
    assert torch.allclose(z.grad, want, atol=1e-6)


def test_focal_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(100, generator=g), (torch.rand(100, generator=g) > 0.7).float()
    got = objectness_loss_per_anchor(logits, labels, loss_type="focal", pos_weight=1.0, alpha=0.25, gamma=2.0)
    assert torch.allclose(got, sigmoid_focal_loss(logits, labels, alpha=0.25, gamma=2.0, reduction="none"))


def test_softmax_focal_reduces_to_ce_at_gamma_0_and_downweights_easy():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(20, 5, generator=g), torch.randint(0, 5, (20,), generator=g)
    ce = class_loss_per_roi(logits, labels, loss_type="ce", pos_weight=1.0)
    assert torch.allclose(class_loss_per_roi(logits, labels, loss_type="focal", pos_weight=1.0, gamma=0.0), ce)
    assert (class_loss_per_roi(logits, labels, loss_type="focal", pos_weight=1.0, gamma=2.0) <= ce + 1e-7).all()


@pytest.mark.parametrize("kind,reference", [("giou", generalized_box_iou_loss), ("diou", distance_box_iou_loss),
                                            ("ciou", complete_box_iou_loss)])
def test_iou_losses_match_torchvision(kind, reference):
    g = torch.Generator().manual_seed(2)
    anchors, gt = random_boxes(30, g), random_boxes(30, g)
    deltas = torch.randn(30, 4, generator=g) * 0.3
    got = box_loss_per_box(deltas, anchors, gt, CODER, loss_type=kind)
    want = reference(CODER.decode_single(deltas, anchors), gt, reduction="none")
    assert torch.allclose(got, want, atol=1e-6)


def test_smooth_l1_hand_computed():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[1.0, 0.0, 11.0, 10.0]])  # dx = 0.1 * 10 (weight) = 1.0
    got = box_loss_per_box(torch.zeros(1, 4), anchors, gt, CODER, loss_type="smooth_l1", beta=1 / 9)
    assert got.item() == pytest.approx(1.0 - 0.5 / 9)
    assert box_loss_per_box(torch.zeros(1, 4), anchors, gt, CODER, loss_type="l1").item() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["diou", "ciou"])
def test_diou_ciou_gradient_for_disjoint_boxes(kind):
    anchors = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    gt = torch.tensor([[40.0, 40.0, 45.0, 45.0]])
    deltas = torch.zeros(1, 4, requires_grad=True)
    box_loss_per_box(deltas, anchors, gt, CODER, loss_type=kind).sum().backward()
    assert deltas.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["smooth_l1", "l1", "giou", "diou", "ciou"])
@pytest.mark.parametrize("n", [10, 0])
def test_box_loss_contract(kind, n):
    """Every box loss: shape [P] (P may be 0), finite, gradient flows, avg_factor divides."""
    g = torch.Generator().manual_seed(3)
    anchors, gt = random_boxes(n, g), random_boxes(n, g)
    deltas = (torch.randn(n, 4, generator=g) * 0.2).requires_grad_()
    loss, factor = loss_rpn_box(deltas, anchors, gt, num_sampled=40, box_coder=CODER, settings=BoxLoss(kind))
    per_box = box_loss_per_box(deltas, anchors, gt, CODER, loss_type=kind)
    assert per_box.shape == (n,) and torch.isfinite(loss) and factor.item() == 40
    assert loss.item() == pytest.approx(per_box.sum().item() / 40, rel=1e-5, abs=1e-7)
    loss.backward()
    assert deltas.grad is not None and deltas.grad.shape == (n, 4)
    loss_p, factor_p = loss_roi_box(deltas.detach(), anchors, gt, num_sampled=40, box_coder=CODER,
                                    settings=BoxLoss(kind, avg_factor="positives"))
    assert factor_p.item() == max(n, 1)


@pytest.mark.parametrize("mode,expected", [("sampled", 8.0), ("positives", 3.0)])
def test_cls_avg_factor_modes(mode, expected):
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0])
    _, factor = loss_rpn_cls(torch.zeros(8), labels.float(), ClsLoss("bce", avg_factor=mode))
    _, factor_roi = loss_roi_cls(torch.zeros(8, 3), labels, ClsLoss("ce", avg_factor=mode))
    assert factor.item() == factor_roi.item() == expected


def test_avg_factor_clamped_and_empty_sum_is_zero():
    assert avg_factor_from_count(0, torch.device("cpu")).item() == 1.0
    loss, factor = loss_rpn_cls(torch.zeros(0), torch.zeros(0), ClsLoss("bce", avg_factor="positives"))
    assert loss.item() == 0.0 and factor.item() == 1.0


def test_l1_term_seeded_expected_value():
    """loss_roi_box with l1: the summed absolute delta error of the positives over the sampled RoIs."""
    g = torch.Generator().manual_seed(7)
    proposals, gt = random_boxes(5, g), random_boxes(5, g)
    deltas = torch.randn(5, 4, generator=g) * 0.3
    target = CODER.encode_single(gt, proposals)
    expected = (deltas - target).abs().sum() / 64
    loss, factor = loss_roi_box(deltas, proposals, gt, num_sampled=64, box_coder=CODER, settings=BoxLoss("l1"))
    assert factor.item() == 64 and loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_logit_adjustment_offsets_and_their_effect_on_the_loss():
    """tau x log(n_c / n_max) per foreground class, 0 for background; a rare class's positive
    costs more and a frequent class's sample pushes the rare logit down less."""
    from rcnn_trainer.losses.classification import class_logit_offsets

    offsets = class_logit_offsets([100, 25, 0], tau=1.0)
    assert offsets.tolist() == pytest.approx([0.0, 0.0, math.log(0.25), math.log(0.01)])
    assert class_logit_offsets([100, 25], tau=0.5).tolist() == pytest.approx([0.0, 0.0, 0.5 * math.log(0.25)])
    logits = torch.zeros(2, 3)
    labels = torch.tensor([2, 1])  # a rare-class positive, a frequent-class positive
    plain = class_loss_per_roi(logits, labels, loss_type="ce", pos_weight=1.0)
    adjusted = class_loss_per_roi(logits + class_logit_offsets([100, 25], 1.0), labels, loss_type="ce", pos_weight=1.0)
    assert adjusted[0] > plain[0] and adjusted[1] < plain[1]
    grads = []
    for extra in (torch.zeros(3), class_logit_offsets([100, 25], 1.0)):
        z = torch.zeros(1, 3, requires_grad=True)
        class_loss_per_roi(z + extra, torch.tensor([1]), loss_type="ce", pos_weight=1.0).sum().backward()
        grads.append(z.grad[0, 2].item())  # the push on the rare class's logit from a frequent positive
    assert 0 < grads[1] < grads[0]


def test_logit_adjustment_in_the_roi_heads(tmp_path):
    """Set from the drawn object counts, used in the training loss only, not saved."""
    from rcnn_trainer.config_loader import load_config
    from rcnn_trainer.model.build import build_model

    cfg = load_config("config.yaml", ["model.num_classes=3", "model.anchors.sizes=[[16],[32],[64],[128],[256]]",
                                      "model.backbone.fpn_channels=16", "model.roi.representation_size=32",
                                      "model.roi.batch_size_per_image=16", "model.roi.cls_loss.logit_adjust=1.0"])
    assert cfg.model.roi.cls_loss.type == "ce"  # a partial override keeps the head's type
    model = build_model(cfg.model)
    heads = model.roi_heads
    heads.set_class_counts([40.0, 10.0, 4.0])
    assert heads.class_logit_offsets.tolist() == pytest.approx([0.0, 0.0, math.log(0.25), math.log(0.1)])
    assert "roi_heads.class_logit_offsets" not in model.state_dict()
    with pytest.raises(ValueError, match="2 class counts for a head of 3"):
        heads.set_class_counts([1.0, 2.0])
    logits = torch.zeros(2, 4)
    labels = torch.tensor([3, 0])
    loss, _ = heads._losses(logits, torch.zeros(2, 16), torch.tensor([[0.0, 0, 8, 8], [0, 0, 4, 4]]), labels,
                            torch.tensor([[0.0, 0, 8, 8], [0, 0, 4, 4]]), torch.tensor([True, True]), 1)
    expected = loss_roi_cls(logits + heads.class_logit_offsets, labels, ClsLoss("ce"))[0]
    assert loss["loss_roi_cls"].item() == pytest.approx(expected.item())
    assert loss["loss_roi_cls"].item() != pytest.approx(loss_roi_cls(logits, labels, ClsLoss("ce"))[0].item())


def test_losses_import_no_config_and_no_engine():
    """losses/ sits below the config builders and the trainer (DESIGN.md's layers): its
    settings and weights come in as plain objects."""
    import ast
    from pathlib import Path

    import rcnn_trainer.losses as package
    for path in Path(package.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m == "rcnn_trainer.config" or m.startswith(("rcnn_trainer.train", "rcnn_trainer.infer", "rcnn_trainer.runtime"))], path
