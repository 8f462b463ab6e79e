"""Is bf16 autocast worth it on this CPU? resnet18 forward+backward in fp32 and bf16, NCHW and
channels_last, at the default run's size (batch 8, 128 px). Prints seconds per pass (best of 3
after one warm-up) and what the CPU offers (AMX / AVX512-BF16).

  python tools/cpu_precision.py [--threads 2] [--batch 8] [--size 128]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from rcnn_trainer.runtime.device import cpu_has_fast_bf16


def seconds_per_pass(model, images, bf16: bool, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(images)
        out.float().sum().backward()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; AMX or AVX512-BF16: {cpu_has_fast_bf16()}")
    model = torchvision.models.resnet18(norm_layer=torch.nn.BatchNorm2d)
    images = torch.randn(args.batch, 3, args.size, args.size)
    results = {}
    for layout in ("NCHW", "channels_last"):
        if layout == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        for dtype in ("fp32", "bf16"):
            results[(layout, dtype)] = seconds_per_pass(model, images, dtype == "bf16")
            print(f"{layout:13s} {dtype}: {results[(layout, dtype)]:.3f} s per forward+backward", flush=True)
    base = results[("NCHW", "fp32")]
    print("speed vs fp32 NCHW: " + ", ".join(f"{l} {d} {base / t:.2f}x" for (l, d), t in results.items()))


if __name__ == "__main__":
    main()
