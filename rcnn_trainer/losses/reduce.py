"""avg_factor: the explicit normalizer of every loss term.

A loss term is `sum of its elements / avg_factor`, where avg_factor counts what the batch
holds (sampled anchors or RoIs, or positives), is clamped to at least 1, and under DDP is
averaged across ranks first: every rank then divides by the same number, and DDP's gradient
average gives exactly sum over all ranks / total count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rcnn_trainer.dist_state import is_distributed


def avg_factor_from_count(count: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Mean of `count` across ranks (a no-op in one process), clamped to >= 1. Scalar float32."""
    factor = torch.as_tensor(count, dtype=torch.float32, device=device).clone()
    if is_distributed():
        dist.all_reduce(factor)  # a sync point between ranks
        factor = factor / dist.get_world_size()
    return factor.clamp(min=1.0)


def sum_over_avg_factor(elementwise: torch.Tensor, avg_factor: torch.Tensor) -> torch.Tensor:
    """The normalization every term uses; elementwise may be empty (sum is 0, gradient kept)."""
    return elementwise.float().sum() / avg_factor
