"""Batched matching and sampling (model/matching.py) against torchvision's per-image code."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou

from rcnn_trainer.model.build import build_model
from rcnn_trainer.model.matching import BELOW, batched_box_iou, match_boxes, pad_boxes, sample_balanced

from conftest import tiny_config


def random_boxes(count: int, size: float = 100.0, generator=None) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=generator) * size
    wh = 1 + torch.rand(count, 2, generator=generator) * size / 2
    return torch.cat([xy, xy + wh], dim=1)


def batch(gt_counts, num_boxes, seed=0):
    g = torch.Generator().manual_seed(seed)
    gts = [random_boxes(n, generator=g) for n in gt_counts]
    boxes = random_boxes(len(gt_counts) * num_boxes, generator=g).view(len(gt_counts), num_boxes, 4)
    # ties: a duplicated GT, and boxes equal to a GT (IoU 1 for two GTs / for several boxes)
    if gt_counts[0] >= 2:
        gts[0][1] = gts[0][0]
        boxes[0, :3] = gts[0][0]
    return gts, boxes


@pytest.mark.parametrize("allow_low_quality", [True, False])
def test_match_equals_torchvision_matcher(allow_low_quality):
    gts, boxes = batch([5, 0, 1, 12], 300)
    matcher = det_utils.Matcher(0.7, 0.3, allow_low_quality_matches=allow_low_quality)
    gt, gt_valid = pad_boxes(gts)
    ours = match_boxes(gt, gt_valid, boxes, high=0.7, low=0.3, allow_low_quality=allow_low_quality,
                       max_elements=2000)  # forces chunks of one image
    assert ours.shape == (4, 300)
    for i, g in enumerate(gts):
        expected = matcher(box_iou(g, boxes[i])) if len(g) else torch.full((300,), BELOW)
        assert torch.equal(ours[i], expected), i
    # the threshold bands and low-quality restores actually happen on this data
    assert (ours == -2).any() and (ours >= 0).any() and (ours == -1).any()


def test_batched_iou_equals_box_iou():
    gts, boxes = batch([4, 7], 50, seed=1)
    gt, _ = pad_boxes(gts)
    iou = batched_box_iou(gt, boxes)
    for i, g in enumerate(gts):
        assert torch.allclose(iou[i, :len(g)], box_iou(g, boxes[i]), atol=1e-6)


def test_rpn_targets_equal_torchvision(tmp_path):
    model = build_model(tiny_config(tmp_path).model).train()
    gts, _ = batch([3, 0, 6], 1, seed=2)
    anchors = [random_boxes(500, generator=torch.Generator().manual_seed(5))] * 3
    targets = [{"boxes": g, "labels": torch.ones(len(g), dtype=torch.int64)} for g in gts]
    labels, matched = model.rpn.assign_targets(torch.stack(anchors), targets)
    tv_labels, tv_matched = model.rpn.assign_targets_to_anchors(anchors, targets)  # torchvision's own
    for i in range(3):
        assert torch.equal(labels[i], tv_labels[i]) and torch.equal(matched[i], tv_matched[i]), i


def test_roi_sampling_keeps_torchvision_labels(tmp_path):
    """With room for every RoI the random sampler keeps all but the ignored ones: the labels and
    matched boxes must be torchvision's assign_targets_to_proposals'."""
    model = build_model(tiny_config(tmp_path, model={"roi": {"batch_size_per_image": 10_000,
                                                             "positive_fraction": 1.0}}).model).train()
    heads = model.roi_heads
    gts, _ = batch([2, 0, 5], 1, seed=3)
    g = torch.Generator().manual_seed(4)
    proposals = [random_boxes(n, generator=g) for n in (40, 25, 60)]
    targets = [{"boxes": b, "labels": torch.randint(1, 4, (len(b),), generator=g)} for b in gts]
    rois, labels, matched, from_rpn = heads._sample(proposals, targets, None, None)

    with_gt = heads.add_gt_proposals(proposals, gts)
    tv_idx, tv_labels = heads.assign_targets_to_proposals(with_gt, gts, [t["labels"] for t in targets])
    kept = [l >= 0 for l in tv_labels]
    assert [len(r) for r in rois] == [int(k.sum()) for k in kept]
    assert torch.equal(torch.cat(rois), torch.cat([p[k] for p, k in zip(with_gt, kept)]))
    assert torch.equal(labels, torch.cat([l[k] for l, k in zip(tv_labels, kept)]))
    expected_boxes = [b[i[k]] if len(b) else torch.zeros((int(k.sum()), 4)) for b, i, k in zip(gts, tv_idx, kept)]
    assert torch.equal(matched, torch.cat(expected_boxes))
    assert torch.equal(from_rpn, torch.cat([torch.arange(len(k))[k] < len(p) for p, k in zip(proposals, kept)]))


def test_sample_balanced_counts_and_uniformity():
    torch.manual_seed(0)
    labels = torch.full((3, 400), -1)
    labels[0, :10] = 1        # few positives: all kept, negatives fill the rest
    labels[0, 100:300] = 0
    labels[1, :300] = 2       # many positives: capped at 64 x 0.25 = 16
    labels[1, 300:] = 0
    # image 2: everything ignored
    pos, neg = sample_balanced(labels, 64, 0.25)
    assert pos.sum(1).tolist() == [10, 16, 0] and neg.sum(1).tolist() == [54, 48, 0]
    assert not (pos & (labels < 1)).any() and not (neg & (labels != 0)).any()
    # uniform: over many draws every positive of image 1 is picked ~16/300 of the time
    counts = torch.zeros(300)
    for _ in range(600):
        counts += sample_balanced(labels, 64, 0.25)[0][1, :300].float()
    share = counts / 600
    assert abs(share.mean() - 16 / 300) < 1e-6 and share.min() > 0.02 and share.max() < 0.10

