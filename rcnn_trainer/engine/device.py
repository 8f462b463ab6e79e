"""Which device, moving batches to it, and the autocast that goes with it."""

from __future__ import annotations

import contextlib

import torch

from rcnn_trainer.engine.distributed import DistInfo


def device_kind(setting: str) -> str:
    return "cuda" if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()) else "cpu"


def pick_device(setting: str, info: DistInfo | None = None) -> torch.device:
    if device_kind(setting) == "cuda":
        local_rank = info.local_rank if info is not None else 0
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast_for(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA (with a GradScaler), bf16 on CPU (no scaler needed)."""
    if not enabled:
        return contextlib.nullcontext
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [dict(t, boxes=t["boxes"].to(device), labels=t["labels"].to(device)) for t in targets]
    return images, targets
