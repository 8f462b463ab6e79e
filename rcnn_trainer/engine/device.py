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
        torch.backends.cudnn.benchmark = True  # batch shapes repeat (fixed resize, size_divisible 32)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def amp_dtype(device: torch.device, enabled: bool, setting: str = "auto") -> torch.dtype | None:
    """None without AMP; else fp16 on CUDA and bf16 on CPU unless `setting` names one."""
    if not enabled:
        return None
    if setting == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return getattr(torch, setting)


def autocast_for(device: torch.device, enabled: bool, setting: str = "auto"):
    dtype = amp_dtype(device, enabled, setting)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler_for(device: torch.device, enabled: bool, setting: str = "auto") -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (bf16 has fp32's range: no scaling needed)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, enabled, setting) == torch.float16)


def to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [dict(t, boxes=t["boxes"].to(device, non_blocking=True), labels=t["labels"].to(device, non_blocking=True))
               for t in targets]
    return images, targets
