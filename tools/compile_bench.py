"""torch.compile on this machine: what compiling costs and what it saves, for training steps and
for inference, at a config's sizes.

  python tools/compile_bench.py --config config.yaml --iters 30 --threads 2 --out compile.json

Each variant runs in its own process: eager, and torch.compile (inductor) of the backbone + FPN
(the dense part with static shapes; the RPN and RoI heads have data-dependent shapes, NMS and
sampling, which break graphs) and of the whole model. Reported: the wall time of the first step
(compilation included), the median step after `--warmup`, and the break-even point: the
iterations after which compiling has paid for itself (compile cost / saving per step), next to
the default run's 600 and a 10,000-iteration run; and what the variants compute (inference: the
detections of the same weights; training: the loss after the same steps), since a speed figure
without its result is not one. Training uses the trainer's optimizer and
loss weighting on the config's batches; inference the model in eval mode on validation images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ["eager", "backbone", "model"]


def child(config: str, variant: str, task: str, iters: int, warmup: int, threads: int, overrides: list[str]) -> dict:
    from rcnn_trainer.config_loader import load_config
    from rcnn_trainer.data.loader import build_dataset, build_train_loader
    from rcnn_trainer.data.settings import resolve_from_data
    from rcnn_trainer.runtime.device import to_device
    from rcnn_trainer.train.optim import build_optimizer
    from rcnn_trainer.losses.weighting import weighted_total
    from rcnn_trainer.model.build import build_loss_weights, build_model

    torch.set_num_threads(threads)
    cfg = load_config(config, overrides)
    train_set = build_dataset(cfg, "train")
    cfg = resolve_from_data(cfg, train_set, lambda _: None)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    if variant == "backbone":
        model.backbone.compile()  # in place: the state dict keeps its names (train.compile does this)
    runner = torch.compile(model) if variant == "model" else model
    times = []
    if task == "train":
        model.train()
        optimizer = build_optimizer(model, cfg.solver)
        weights = build_loss_weights(cfg.model).final()
        batches = iter(build_train_loader(cfg, train_set))
        for _ in range(warmup + iters):
            images, targets = to_device(*next(batches), torch.device("cpu"))
            t0 = time.perf_counter()
            losses, _ = runner(images, targets)
            total, _ = weighted_total(losses, weights)
            total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        outcome = {"last_loss": float(total)}
    else:
        model.eval()
        val_set = build_dataset(cfg, "val")
        batch = cfg.data.batch_size
        images = [val_set[i][0] for i in range(min(len(val_set), batch * (warmup + iters)))]
        with torch.no_grad():
            for step in range(warmup + iters):
                chunk = images[(step * batch) % len(images):][:batch] or images[:batch]
                t0 = time.perf_counter()
                runner(chunk)
                times.append(time.perf_counter() - t0)
            found = runner(images[:batch])  # the same untrained weights in every variant: same detections?
        outcome = {"detections": [len(d["boxes"]) for d in found], "box_sum": float(sum(d["boxes"].sum() for d in found))}
    return {"first_step_s": times[0], "warmup_total_s": sum(times[:warmup]),
            "steady_s": statistics.median(times[warmup:]), **outcome}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps before timing (compilation happens in them)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tasks", nargs="+", default=["train", "infer"])
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "TASK"), help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.child:
        result = child(args.config, *args.child, args.iters, args.warmup, args.threads, args.overrides)
        print("RESULT " + json.dumps(result), flush=True)
        return
    report = {"config": args.config, "threads": args.threads, "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "runs": {}}
    for task in args.tasks:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--child", variant, task, "--config", args.config, "--iters",
                   str(args.iters), "--warmup", str(args.warmup), "--threads", str(args.threads), "--", *args.overrides]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                result = {"failed": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "no output"}
            else:
                result = json.loads(lines[-1][len("RESULT "):])
            report["runs"][f"{task}/{variant}"] = result
            eager = report["runs"].get(f"{task}/eager", {})
            line = f"[{task} {variant}] " + (result.get("failed") or
                                             f"first step {result['first_step_s']:.1f} s, steady {result['steady_s']:.3f} s/step")
            if variant != "eager" and "steady_s" in result and "steady_s" in eager:
                saving = eager["steady_s"] - result["steady_s"]
                extra = result["warmup_total_s"] - eager["warmup_total_s"]
                result["saving_per_step_s"], result["compile_cost_s"] = saving, extra
                result["break_even_steps"] = extra / saving if saving > 0 else None
                line += (f"; vs eager {eager['steady_s']:.3f}: " + (
                    f"saves {saving * 1000:.0f} ms/step, compiling costs {extra:.0f} s, pays after "
                    f"{extra / saving:.0f} steps (600 steps: {600 * saving - extra:+.0f} s, 10,000: "
                    f"{10000 * saving - extra:+.0f} s)" if saving > 0 else f"no saving ({saving * 1000:+.0f} ms/step)"))
            if variant != "eager" and "box_sum" in result and "box_sum" in eager:
                line += (f"; detections {result['detections']} vs eager {eager['detections']}, box sum "
                         f"{result['box_sum']:.1f} vs {eager['box_sum']:.1f}")
            if variant != "eager" and "last_loss" in result and "last_loss" in eager:
                line += f"; loss after {args.warmup + args.iters} steps {result['last_loss']:.4f} vs eager {eager['last_loss']:.4f}"
            print(line, flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
