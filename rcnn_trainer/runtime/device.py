"""Which device, moving batches to it, and the autocast that goes with it."""

from __future__ import annotations

import contextlib

import torch

from rcnn_trainer.runtime.distributed import DistInfo


def device_kind(setting: str) -> str:
    return "cuda" if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()) else "cpu"


def pick_device(setting: str, info: DistInfo | None = None) -> torch.device:
    if device_kind(setting) == "cuda":
        local_rank = info.local_rank if info is not None else 0
        torch.cuda.set_device(local_rank)
        torch.backends.cudnn.benchmark = True  # batch shapes repeat (fixed resize, size_divisible 32)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16. With them bf16 convolutions ran ~2.5x faster than fp32 (an AMX Xeon);
    without them oneDNN emulates bf16, which ran 8-17x slower than fp32 (an AVX2-only EPYC)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def amp_dtype(device: torch.device, enabled: bool, setting: str = "auto") -> torch.dtype | None:
    """None without AMP; else fp16 on CUDA and bf16 on CPU unless `setting` names one. `auto` on a
    CPU without bf16 hardware stays fp32 (see cpu_has_fast_bf16)."""
    if not enabled:
        return None
    if setting == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return getattr(torch, setting)


def amp_summary(device: torch.device, enabled: bool, setting: str, scaler_enabled: bool) -> str:
    """The one log line that says what `solver.amp` became on this machine, and why."""
    dtype = amp_dtype(device, enabled, setting)
    if dtype is None:
        return ("AMP: fp32. This CPU has neither AMX nor AVX512-BF16, so bf16 would run emulated (measured "
                "8-17x slower than fp32 on such a CPU); solver.amp_dtype=bfloat16 forces it.")
    scaling = (" with a GradScaler (its overflow steps are skipped and counted as amp_overflow)"
               if scaler_enabled else " (no loss scaling needed)")
    return f"AMP: {dtype} autocast on {device.type}{scaling}"


def use_channels_last(device: torch.device, setting: bool | str, autocast_dtype: torch.dtype | None) -> bool:
    """`train.channels_last: auto`: NHWC where it pays, i.e. with autocast (oneDNN's bf16 kernels
    on CPU, tensor cores on CUDA); in fp32 on an AVX2 CPU NHWC measured 5% slower."""
    if setting != "auto":
        return bool(setting)
    return autocast_dtype is not None


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
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
               for t in targets]  # boxes, labels and, with masks on, masks
    return images, targets
