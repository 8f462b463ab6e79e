"""Matching and balanced sampling for a whole batch at once.

torchvision matches and samples image by image in Python (a box_iou, a Matcher call and two
randperms per image). These functions do the same on padded [N, ...] tensors in a handful of
ops, with torchvision's rules:
- `match`: torchvision's Matcher. The best GT per box by IoU; below `low` -> BELOW (-1),
  in [low, high) -> BETWEEN (-2); with `allow_low_quality`, every box that is some GT's best
  match (ties included) keeps that match whatever its IoU.
- `sample_balanced`: torchvision's BalancedPositiveNegativeSampler. Per image at most
  batch_size x positive_fraction positives, negatives fill the rest, each a uniform random
  subset (drawn with random keys instead of randperm: the same distribution, other draws).

Shapes: N images, G = most GT boxes in an image (padded), M boxes per image (anchors or
proposals, padded).
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

BELOW, BETWEEN = -1, -2  # torchvision's Matcher.BELOW_LOW_THRESHOLD / BETWEEN_THRESHOLDS


def pad_boxes(boxes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, max count, 4] zero-padded boxes and the [N, max count] mask of real ones."""
    padded = pad_sequence(boxes, batch_first=True)
    counts = torch.tensor([b.shape[0] for b in boxes], device=padded.device)
    valid = torch.arange(padded.shape[1], device=padded.device) < counts[:, None]
    return padded, valid


def batched_box_iou(gt: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU [N, G, M] of gt [N, G, 4] with boxes [N, M, 4] (xyxy), as torchvision's box_iou.
    Coordinates are made planes ([N, 4, G] / [N, 4, M]) first: broadcasting strided xyxy
    rows measured ~15x slower on CPU."""
    g = gt.transpose(1, 2).contiguous()[..., None]  # [N, 4, G, 1]
    b = boxes.transpose(1, 2).contiguous()[:, :, None, :]  # [N, 4, 1, M]
    w = (torch.minimum(g[:, 2], b[:, 2]) - torch.maximum(g[:, 0], b[:, 0])).clamp_(min=0)
    h = (torch.minimum(g[:, 3], b[:, 3]) - torch.maximum(g[:, 1], b[:, 1])).clamp_(min=0)
    inter = w.mul_(h)
    area_gt = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
    area_boxes = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_gt + area_boxes - inter)


def match_boxes(gt: torch.Tensor, gt_valid: torch.Tensor, boxes: torch.Tensor, *, high: float, low: float,
                allow_low_quality: bool, max_elements: int = 1 << 24) -> torch.Tensor:
    """Matched GT index per box [N, M] (or BELOW / BETWEEN) of boxes [N, M, 4] against padded
    gt [N, G, 4]. Images are taken a few at a time so the IoU matrices stay under
    `max_elements` (at 800 px a batch has ~250k anchors per image)."""
    per_chunk = max(1, max_elements // max(1, gt.shape[1] * boxes.shape[1]))
    return torch.cat([match(batched_box_iou(gt[i:i + per_chunk], boxes[i:i + per_chunk]), gt_valid[i:i + per_chunk],
                            high=high, low=low, allow_low_quality=allow_low_quality)
                      for i in range(0, gt.shape[0], per_chunk)])


def match_with(matcher, gt: torch.Tensor, gt_valid: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """`match_boxes` with the thresholds of a torchvision `Matcher` (the RPN's or the RoI head's)."""
    return match_boxes(gt, gt_valid, boxes, high=matcher.high_threshold, low=matcher.low_threshold,
                       allow_low_quality=matcher.allow_low_quality_matches)


def match(iou: torch.Tensor, gt_valid: torch.Tensor, *, high: float, low: float,
          allow_low_quality: bool) -> torch.Tensor:
    """Matched GT index per box [N, M] (or BELOW / BETWEEN) from IoU [N, G, M]; padded GT
    rows (gt_valid False) never match. An image without GT gets BELOW everywhere."""
    if iou.shape[1] == 0:
        return torch.full((iou.shape[0], iou.shape[2]), BELOW, dtype=torch.int64, device=iou.device)
    # padded GT below any real IoU (>= 0): the first-maximum rule then picks what torchvision picks
    iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)
    best, best_gt = iou.max(dim=1)
    # torch.where, not masked index assignment: no nonzero() per rule
    matches = torch.where(best < low, BELOW, torch.where(best < high, BETWEEN, best_gt))
    if allow_low_quality:
        best_per_gt = iou.max(dim=2, keepdim=True).values
        is_best = (iou == best_per_gt) & gt_valid[:, :, None]
        matches = torch.where(is_best.any(dim=1), best_gt, matches)
    return matches


def sample_balanced(labels: torch.Tensor, batch_size_per_image: int,
                    positive_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative masks [N, M] from labels [N, M] (>= 1 positive, 0 negative,
    -1 ignored)."""
    positive, negative = labels >= 1, labels == 0
    max_pos = int(batch_size_per_image * positive_fraction)
    num_pos = positive.sum(dim=1).clamp(max=max_pos)
    num_neg = negative.sum(dim=1).clamp(max=batch_size_per_image - num_pos)
    return _random_subset(positive, num_pos, max_pos), _random_subset(negative, num_neg, batch_size_per_image)


def _random_subset(candidates: torch.Tensor, counts: torch.Tensor, most: int) -> torch.Tensor:
    """Per row, `counts[row]` (<= most) of the True entries of `candidates`, uniformly at
    random. `most` bounds the work without reading counts on the host (no sync)."""
    chosen = torch.zeros_like(candidates)
    k = min(most, candidates.shape[1])
    if k == 0:
        return chosen
    keys = torch.rand(candidates.shape, device=candidates.device).masked_fill(~candidates, 2.0)
    smallest = keys.topk(k, dim=1, largest=False).indices  # the k lowest keys: candidates first
    keep = torch.arange(k, device=candidates.device)[None, :] < counts[:, None]
    return chosen.scatter_(1, smallest, keep)
