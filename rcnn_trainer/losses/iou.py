"""IoU of matched box pairs (row i with row i).

torchvision's box_iou compares every box with every other ([N, M]); taking its diagonal for
matched pairs is quadratic in memory and time. torchvision has no elementwise IoU, hence this.
"""

from __future__ import annotations

import torch


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b: [P, 4] xyxy -> IoU of a[i] with b[i], [P]."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area_a + area_b - inter).clamp(min=1e-7)
