"""Backbones side by side: the same recipe, data, seed and iterations, one backbone each.

  python tools/backbone_bench.py --iters 60 --batch 4 --lock /tmp/heavy.lock --out /tmp/backbone_bench.json

Each run is the real `rcnn-train` command on --recipe (config.yaml by default: the synthetic
shapes at 128 px, AdamW, bf16 autocast where the CPU has it) with the data, batch, iterations,
seed and `model.backbone.name` overridden, nothing else: from scratch (`weights: null`, BatchNorm
trainable as config.yaml sets it; ConvNeXt and Swin keep their LayerNorm), so at a few dozen
iterations the APs are small and say more about how fast each backbone starts than about what
it reaches; with ImageNet weights (`model.backbone.weights=imagenet`, --weights) the ranking can
differ. Reported per backbone: AP, AP50 of the run's own COCO evaluation on the val split, the
median s/iter, the parameters, and the peak resident memory of the training process (its
data-loading workers not counted). With --lock each training run waits for that file's flock;
results are cached in --out, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_bench import DATASETS, data_overrides  # noqa: E402  (tools/ is not a package)

BACKBONES = ["resnet18", "resnet50", "resnext50_32x4d", "regnet_y_800mf", "convnext_tiny", "swin_t"]


def child(argv: list[str], peak_file: Path) -> int:
    """rcnn-train in this process, then its peak resident memory (MiB) into peak_file."""
    from rcnn_trainer.cli import train_main

    code = train_main(argv)
    peak_file.write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))  # KiB on Linux
    return code


def train_once(recipe: str, overrides: list[str], out: Path, threads: int, lock: Path | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    peak = out / "peak_rss_mib.txt"
    cmd = [sys.executable, __file__, "--child", str(peak), "--config", recipe, "--output-dir", str(out / "run"),
           "--no-progress", f"train.threads={threads}", *overrides]
    if lock is not None:
        cmd = ["flock", str(lock), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"rcnn-train failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [r for r in records if r["type"] == "eval"][-1]
    train = [r for r in records if r["type"] == "train"]
    return {"AP": final["AP"], "AP50": final["AP50"], "AP75": final["AP75"],
            "s_per_iter": statistics.median(r["time"] for r in train[1:] or train), "wall_s": wall,
            "peak_rss_mib": float(peak.read_text()),
            "alarms": [f"{r['name']}@{r['iter']}" for r in records if r["type"] == "alarm"]}


def parameter_count(name: str) -> float:
    """Millions of parameters of the backbone body (torchvision's classifier without its head)."""
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    head = ("fc.", "classifier.", "head.")
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(head)) / 1e6


def run_key(args, name: str) -> str:
    return f"{args.dataset}/{name}/seed{args.seed}/iters{args.iters}/batch{args.batch}/{args.weights or 'scratch'}"


def run_all(args) -> dict:
    cache = json.loads(args.out.read_text()) if args.out.is_file() else {}
    extra = [f"model.backbone.weights={args.weights}"] if args.weights else []
    for name in args.backbones:
        key = run_key(args, name)
        if key in cache:
            continue
        overrides = data_overrides(args.dataset, args.data_dir, args.batch, args.iters, args.seed)
        overrides += [f"model.backbone.name={name}", *extra]
        result = train_once(args.recipe, overrides, args.work_dir / key.replace("/", "_"), args.threads, args.lock)
        result["body_params_m"] = parameter_count(name)
        cache[key] = result
        args.out.write_text(json.dumps(cache, indent=1))
        print(f"{key}: AP {result['AP']:.3f} AP50 {result['AP50']:.3f}  {result['s_per_iter']:.3f} s/it  "
              f"peak {result['peak_rss_mib']:.0f} MiB  alarms {result['alarms'] or 'none'}", flush=True)
    return cache


def table(cache: dict, args) -> str:
    base = None
    lines = ["| backbone | body params (M) | AP | AP50 | s/iter | vs resnet18 | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for name in args.backbones:
        r = cache[run_key(args, name)]
        base = r["s_per_iter"] if name == "resnet18" else base
        ratio = f"{r['s_per_iter'] / base:.2f}x" if base else "-"
        lines.append(f"| {name} | {r['body_params_m']:.1f} | {r['AP']:.3f} | {r['AP50']:.3f} | "
                     f"{r['s_per_iter']:.3f} | {ratio} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="config.yaml")
    p.add_argument("--dataset", default="synthetic", choices=DATASETS)
    p.add_argument("--backbones", nargs="+", default=BACKBONES)
    p.add_argument("--weights", default=None, help="model.backbone.weights for every run (default: from scratch)")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/backbone_bench_runs"))
    p.add_argument("--lock", type=Path, default=None, help="flock this file around each training run")
    p.add_argument("--out", type=Path, default=Path("backbone_bench.json"))
    args = p.parse_args(argv)
    cache = run_all(args)
    print(f"\n{args.dataset}, {args.iters} iterations, batch {args.batch}, recipe {args.recipe}, seed {args.seed}, "
          f"weights {args.weights or 'none (from scratch)'}")
    print(table(cache, args))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        raise SystemExit(child(sys.argv[3:], Path(sys.argv[2])))
    raise SystemExit(main())
