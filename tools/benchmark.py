"""Side-by-side benchmark: rcnn_trainer vs torchvision's FasterRCNN (MaskRCNN with
`model.mask.enabled=true`) at identical settings.

Both models get the same backbone+FPN (same weights), anchors, RPN/RoI sampling and head
sizes, the same batches from the same DataLoader, and the same thread count; torchvision
keeps its own RoIAlign kernel. Each measurement runs in its own subprocess (so peak memory is
per model); ratios are rcnn_trainer / torchvision (below 1.0 = rcnn_trainer is faster).

  python tools/benchmark.py --config config.yaml --backbones resnet18 resnet50 \
      --iters 20 --converge-iters 300 --out bench.json

Speed, in one run on the same batches: fp32 ours vs fp32 torchvision, and AMP ours (bf16 on a
CPU with AMX/AVX512-BF16, fp16 on CUDA) vs fp32 torchvision where the hardware has it: median
s/iter after warm-up, data wait share, inference images/s, COCO eval time, peak RSS (CPU) or
CUDA memory, and a per-component profile of the step (tools/step_profile.py).
Inference with trained weights (`--inference-checkpoint RUN/model_final.pth`): both models hold
that checkpoint's weights, so their detections and AP are the same; img/s at each
`--inference-batches` size and the time per stage.
Convergence: COCO AP/AP50 after the same iterations with the config's optimizer and
schedule, for fp32 ours, fp32 torchvision and AMP ours, so speed never hides an accuracy
loss (`--small-objects` adds the small-object options: anchors from 8 px, CIoU box loss).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection.transform import resize_boxes

from rcnn_trainer.config_loader import load_config
from rcnn_trainer.data.loader import build_dataset, build_eval_loader, build_train_loader
from rcnn_trainer.data.settings import resolve_from_data
from rcnn_trainer.runtime.device import (amp_dtype, autocast_for, cpu_has_fast_bf16, grad_scaler_for, to_device,
                                        use_channels_last)
from rcnn_trainer.infer.evaluate import evaluate
from rcnn_trainer.train.optim import build_optimizer, build_scheduler
from rcnn_trainer.errors import UserError
from rcnn_trainer.losses.weighting import weighted_total
from rcnn_trainer.model.as_torchvision import torchvision_detector
from rcnn_trainer.model.build import build_loss_weights, build_model
from rcnn_trainer.model.frozen_backbone import freeze_backbone
from rcnn_trainer.monitor.probe import probe

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_profile  # noqa: E402  (tools/ is not a package)

SMALL_OBJECT_OPTIONS = ["model.roi.box_loss.type=ciou", "model.roi.box_loss.weight=2.0",
                        "model.anchors.sizes=[[8],[16],[32],[64],[128]]"]


class TorchvisionFasterRCNN(nn.Module):
    """torchvision's FasterRCNN (MaskRCNN when our model has a mask branch) assembled from the
    same parts as our model, with our calling convention: training returns (losses named like
    ours, {}), eval maps boxes (and masks) to original sizes. torchvision keeps its own RoIAlign
    kernel, matcher, sampler and losses (its mask loss: BCE mean over the positives' pixels)."""

    NAMES = {"loss_objectness": "loss_rpn_cls", "loss_rpn_box_reg": "loss_rpn_box",
             "loss_classifier": "loss_roi_cls", "loss_box_reg": "loss_roi_box", "loss_mask": "loss_roi_mask"}

    def __init__(self, ours: nn.Module, cfg):
        super().__init__()
        self.model = torchvision_detector(ours, cfg)

    def forward(self, images, targets=None, original_sizes=None, masks=True):
        if self.training:
            losses = self.model(images, targets)
            return {self.NAMES[k]: v for k, v in losses.items()}, {}
        detections = self.model(images)
        if original_sizes is not None:
            for det, img, orig in zip(detections, images, original_sizes):
                det["boxes"] = resize_boxes(det["boxes"], img.shape[-2:], orig)
                if "masks" in det:  # pasted at the input size by torchvision: to the original size
                    det["masks"] = nn.functional.interpolate(det["masks"], size=tuple(orig), mode="bilinear",
                                                             align_corners=False) if len(det["masks"]) else \
                        det["masks"].new_zeros((0, 1, *orig))
        if not masks:
            for det in detections:
                det.pop("masks", None)
        return detections


def build(cfg, which: str) -> nn.Module:
    cfg = resolve_from_data(cfg, build_dataset(cfg, "train"), lambda _: None)  # model.*: auto settings
    torch.manual_seed(cfg.seed)  # both start from the same weights
    ours = build_model(cfg.model)
    return ours if which == "rcnn_trainer" else TorchvisionFasterRCNN(ours, cfg)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def training_setup(cfg, which: str, device):
    """Model, optimizer and one training step as the trainer runs them (autocast, GradScaler,
    channels_last for ours), shared by the speed and the convergence measurements."""
    model = build(cfg, which).to(device).train()
    autocast = autocast_for(device, cfg.solver.amp, cfg.solver.amp_dtype)
    scaler = grad_scaler_for(device, cfg.solver.amp, cfg.solver.amp_dtype)
    if which == "rcnn_trainer" and use_channels_last(device, cfg.train.channels_last,
                                                     amp_dtype(device, cfg.solver.amp, cfg.solver.amp_dtype)):
        model.use_channels_last()
    # torchvision's reference scripts construct the optimizer with torch's defaults (per-tensor
    # updates on CPU); ours steps with the fused kernel, as the trainer does
    optimizer = build_optimizer(model, cfg.solver, grad_scaler=scaler.is_enabled(), fused=which == "rcnn_trainer")
    weights = build_loss_weights(cfg.model).final()

    def train_step(batch) -> None:
        images, targets = to_device(*batch, device)
        with autocast():
            losses, _ = model(images, targets)
        total, _ = weighted_total(losses, weights)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return model, optimizer, autocast, train_step


def measure_speed(cfg, which: str, iters: int, warmup: int, device, profile_steps: int) -> dict:
    """Training s/iter (median), data wait share, per-component profile, inference images/s,
    eval time, monitor cost."""
    model, _, autocast, train_step = training_setup(cfg, which, device)
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    batches = iter(build_train_loader(cfg, train_set))

    step_times, data_times = [], []
    for step in range(warmup + iters):
        t0 = time.perf_counter()
        batch = next(batches)
        t_data = time.perf_counter() - t0
        train_step(batch)
        if step >= warmup:
            step_times.append(time.perf_counter() - t0)
            data_times.append(t_data)
    result = {"train_s_per_iter": statistics.median(step_times),
              "data_wait_share": sum(data_times) / sum(step_times)}
    if profile_steps:
        result["components_ms"] = step_profile.profile_steps(model, train_step, batches, profile_steps)
    # inference throughput on the val set, and the whole COCO evaluation time
    model.eval()
    loader = build_eval_loader(cfg, val_set)
    t0 = time.perf_counter()
    metrics, _ = evaluate(model, val_set, loader, device, cfg.monitor.score_thresholds, progress=False, autocast=autocast)
    result["eval_s"] = time.perf_counter() - t0
    with torch.no_grad():
        images = [val_set[i][0].to(device) for i in range(min(len(val_set), 4 * cfg.data.batch_size))]
        t0 = time.perf_counter()
        for start in range(0, len(images), cfg.data.batch_size):
            with autocast():
                model(images[start:start + cfg.data.batch_size])
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["infer_images_per_s"] = len(images) / (time.perf_counter() - t0)
    if which == "rcnn_trainer":  # the monitor's probe inference, per training iteration at its period
        probe_items = [train_set[i] for i in range(cfg.monitor.probe_images)]
        t0 = time.perf_counter()
        with autocast():
            probe(model, [i.to(device) for i, _ in probe_items], [t for _, t in probe_items],
                  cfg.monitor.score_thresholds)
        period = cfg.monitor.period_for(cfg.solver.max_iters)
        result["monitor_overhead_share"] = (time.perf_counter() - t0) / (period * result["train_s_per_iter"])
    result["peak_memory_mb"] = peak_memory_mb(device)
    return result


def measure_convergence(cfg, which: str, iters: int, device) -> dict:
    """Same loop, optimizer and schedule for both; COCO AP on val after `iters` iterations."""
    model, optimizer, autocast, train_step = training_setup(cfg, which, device)
    scheduler = build_scheduler(optimizer, cfg.solver)
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    batches = iter(build_train_loader(cfg, train_set))
    t0 = time.perf_counter()
    for _ in range(iters):
        train_step(next(batches))
        scheduler.step()
    metrics, _ = evaluate(model, val_set, build_eval_loader(cfg, val_set), device, cfg.monitor.score_thresholds,
                          progress=False, autocast=autocast)
    return {"AP": metrics["AP"], "AP50": metrics["AP50"], "train_wall_s": time.perf_counter() - t0,
            **{k: metrics[k] for k in ("segm_AP", "segm_AP50") if k in metrics}}


def stage_timer(modules: dict[str, nn.Module]) -> tuple[dict[str, float], list]:
    """Wall time spent inside each named module's forward (forward hooks), summed over calls."""
    spent, started, handles = {name: 0.0 for name in modules}, {}, []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: started.__setitem__(name, time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, o, name=name: spent.__setitem__(name, spent[name] + time.perf_counter() - started[name])))
    return spent, handles


def inference_comparison(cfg, checkpoint: Path, batches: list[int], repeats: int, count: int) -> dict:
    """Ours and torchvision's FasterRCNN holding the same trained weights (the torchvision model
    is built from our modules: model/as_torchvision.py), on the same validation images at each
    batch size: img/s (best of `repeats`, alternated), where the time goes, and the AP each
    reaches on the val split (the same detections, so the same AP, is the check that the two
    compute the same thing)."""
    from rcnn_trainer.runtime.checkpoint import load_checkpoint
    from rcnn_trainer.data.settings import resolve_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    cfg = resolve_from_checkpoint(cfg, ckpt.get("config", {}))
    eager = build_model(cfg.model).eval()
    eager.load_state_dict(ckpt["model"])
    theirs = TorchvisionFasterRCNN(eager, cfg).eval()
    # ours as rcnn-eval / rcnn-predict run it in fp32 on CPU: the backbone frozen (a copy: theirs keeps the eager modules)
    ours = copy.deepcopy(eager)
    frozen = freeze_backbone(ours, torch.device("cpu"), None)
    val_set = build_dataset(cfg, "val")
    images = [val_set[i][0] for i in range(min(count, len(val_set)))]
    report = {"checkpoint": str(checkpoint), "images": len(images), "by_batch": {}, "ours_backbone_frozen": frozen}
    models = {"ours": ours, "torchvision": theirs}
    stages = {"ours": {"backbone": ours.backbone, "rpn": ours.rpn, "roi_heads": ours.roi_heads},
              "torchvision": {"transform": theirs.model.transform, "backbone": theirs.model.backbone,
                              "rpn": theirs.model.rpn, "roi_heads": theirs.model.roi_heads}}
    with torch.no_grad():
        for name, model in models.items():
            metrics, _ = evaluate(model, val_set, build_eval_loader(cfg, val_set), torch.device("cpu"),
                                  cfg.monitor.score_thresholds, progress=False)
            report[f"AP_{name}"], report[f"AP50_{name}"] = metrics["AP"], metrics["AP50"]
        for batch in batches:
            best, parts = {n: float("inf") for n in models}, {}
            for _ in range(repeats + 1):  # the first round warms up
                for name, model in models.items():
                    spent, handles = stage_timer(stages[name])
                    t0 = time.perf_counter()
                    for start in range(0, len(images), batch):
                        model(images[start:start + batch])
                    wall = time.perf_counter() - t0
                    for h in handles:
                        h.remove()
                    if wall < best[name]:
                        best[name] = wall
                        parts[name] = {k: 1000 * v / len(images) for k, v in spent.items()}
                        parts[name]["rest (pre/post-processing)"] = 1000 * wall / len(images) - sum(parts[name].values())
            report["by_batch"][batch] = {"img_per_s": {n: len(images) / t for n, t in best.items()},
                                         "ms_per_image": parts,
                                         "ratio": best["torchvision"] / best["ours"]}
    return report


def child(args) -> None:
    """One measurement, in this process; prints one JSON line."""
    overrides = [f"model.backbone.name={args.backbone}", f"train.threads={args.threads}", *args.overrides]
    cfg = load_config(args.config, overrides)
    cfg.solver.max_iters = max(cfg.solver.max_iters, args.iters + args.warmup, args.converge_iters)
    cfg.solver.amp = args.precision == "amp"
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    if args.task == "speed":
        out = measure_speed(cfg, args.which, args.iters, args.warmup, device, args.profile_steps)
    else:
        cfg.solver.max_iters = args.converge_iters
        out = measure_convergence(cfg, args.which, args.converge_iters, device)
    print("RESULT " + json.dumps(out), flush=True)


def run_child(args, which: str, task: str, backbone: str, precision: str, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", "--which", which, "--task", task, "--backbone", backbone,
           "--precision", precision, "--config", args.config, "--iters", str(args.iters), "--warmup",
           str(args.warmup), "--threads", str(args.threads), "--converge-iters", str(args.converge_iters),
           "--device", args.device, "--profile-steps", str(args.profile_steps), *args.overrides, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{which} {task} {backbone} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def amp_runs(device: str, force: bool) -> tuple[bool, str]:
    """Whether to measure ours with AMP here, and the reason when not."""
    if device == "cuda" or force or cpu_has_fast_bf16():
        return True, ""
    return False, ("AMP rows skipped: this CPU has neither AMX nor AVX512-BF16, so bf16 runs emulated "
                   "(resnet18 forward+backward measured 8-17x slower than fp32 here); --force-amp runs them")


def speed_line(label: str, ours: dict, theirs: dict) -> str:
    spread = ""
    if len(ours["train_s_per_iter_all"]) > 1:
        spread = (f" [runs: {', '.join(f'{t:.3f}' for t in ours['train_s_per_iter_all'])} vs "
                  f"{', '.join(f'{t:.3f}' for t in theirs['train_s_per_iter_all'])}]")
    return (f"[{label}] train s/iter {ours['train_s_per_iter']:.3f} vs {theirs['train_s_per_iter']:.3f} "
            f"(ratio {ours['train_s_per_iter'] / theirs['train_s_per_iter']:.3f}){spread}; inference img/s "
            f"{ours['infer_images_per_s']:.1f} vs {theirs['infer_images_per_s']:.1f}; eval {ours['eval_s']:.1f}s vs "
            f"{theirs['eval_s']:.1f}s; data wait {100 * ours['data_wait_share']:.1f}% vs "
            f"{100 * theirs['data_wait_share']:.1f}%; peak mem {ours['peak_memory_mb']:.0f} vs "
            f"{theirs['peak_memory_mb']:.0f} MB; monitor overhead {100 * ours['monitor_overhead_share']:.1f}%")


def component_table(columns: dict[str, dict]) -> str:
    """Markdown table: one row per component, ms per step for each measured model."""
    names = list(next(iter(columns.values()))["components_ms"])
    lines = ["| component (ms/step, profiled) | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{c['components_ms'][name]:.0f}" for c in columns.values()) + " |")
    lines.append("| **step (unprofiled median)** | " + " | ".join(
        f"{1000 * c['train_s_per_iter']:.0f}" for c in columns.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--iters", type=int, default=20, help="timed training iterations (after warm-up)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=1, help="speed runs per model, alternated; the median is kept")
    p.add_argument("--profile-steps", type=int, default=2, help="profiled steps for the component table (0 = none)")
    p.add_argument("--converge-iters", type=int, default=0, help="0 = skip the convergence comparison")
    p.add_argument("--small-objects", action="store_true", help="also compare convergence with small-object options")
    p.add_argument("--force-amp", action="store_true", help="measure AMP on a CPU without bf16 hardware too")
    p.add_argument("--device", default="auto", choices=["auto", "cpu"])
    p.add_argument("--out", help="write all results as JSON here")
    p.add_argument("overrides", nargs="*", help="config overrides for both models (e.g. data.batch_size=4)")
    p.add_argument("--inference-checkpoint", type=Path, help="only compare inference, both models holding the "
                   "weights of this trained checkpoint (its config's sizes; overrides may change test-time ones)")
    p.add_argument("--inference-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--which", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--backbone", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    try:
        load_config(args.config, [f"model.backbone.name={b}" for b in args.backbones[:1]] + list(args.overrides))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if args.inference_checkpoint:
        torch.set_num_threads(args.threads)
        found = inference_comparison(load_config(args.config, list(args.overrides)), args.inference_checkpoint,
                                     args.inference_batches, max(args.repeats, 1), 32)
        print(f"[inference, same weights: {found['checkpoint']}, {found['images']} val images, {args.threads} threads, "
              f"our backbone {'frozen' if found['ours_backbone_frozen'] else 'eager'}] "
              f"AP ours {found['AP_ours']:.3f} / torchvision {found['AP_torchvision']:.3f}, AP50 "
              f"{found['AP50_ours']:.3f} / {found['AP50_torchvision']:.3f}")
        for batch, row in found["by_batch"].items():
            ips = row["img_per_s"]
            print(f"  batch {batch}: img/s ours {ips['ours']:.1f}, torchvision {ips['torchvision']:.1f}, "
                  f"ours / torchvision {row['ratio']:.3f}; ms/image " + "; ".join(
                      f"{n}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
                      for n, parts in row["ms_per_image"].items()))
        if args.out:
            Path(args.out).write_text(json.dumps(found, indent=1))
        return
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    with_amp, why_not = amp_runs(device, args.force_amp)
    if why_not:
        print(why_not, flush=True)
    report = {"config": args.config, "threads": args.threads, "overrides": args.overrides, "device": device,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "amp_measured": with_amp,
              "speed": {}, "convergence": {}}
    for backbone in args.backbones:
        models = [("ours fp32", "rcnn_trainer", "fp32"), ("torchvision fp32", "torchvision", "fp32")]
        models += [("ours amp", "rcnn_trainer", "amp")] if with_amp else []
        # alternate the models `--repeats` times (this machine's speed drifts between processes)
        # and keep each one's run with the median step time
        samples = {label: [] for label, _, _ in models}
        for _ in range(args.repeats):
            for label, which, precision in models:
                samples[label].append(run_child(args, which, "speed", backbone, precision, []))
        runs = {label: sorted(found, key=lambda r: r["train_s_per_iter"])[len(found) // 2]
                for label, found in samples.items()}
        for label, found in samples.items():
            runs[label]["train_s_per_iter_all"] = [r["train_s_per_iter"] for r in found]
        theirs = runs["torchvision fp32"]
        report["speed"][backbone] = {**runs, "train_ratio_fp32": runs["ours fp32"]["train_s_per_iter"]
                                     / theirs["train_s_per_iter"]}
        print(speed_line(f"{backbone} fp32 ours vs fp32 torchvision", runs["ours fp32"], theirs), flush=True)
        if with_amp:
            report["speed"][backbone]["train_ratio_amp"] = runs["ours amp"]["train_s_per_iter"] / theirs["train_s_per_iter"]
            print(speed_line(f"{backbone} AMP ours vs fp32 torchvision", runs["ours amp"], theirs), flush=True)
        if args.profile_steps:
            print(component_table(runs), flush=True)
    if args.converge_iters:
        backbone = args.backbones[0]
        settings = [("default", [])] + ([("small_objects", SMALL_OBJECT_OPTIONS)] if args.small_objects else [])
        for label, extra in settings:
            ours = run_child(args, "rcnn_trainer", "converge", backbone, "fp32", extra)
            theirs = run_child(args, "torchvision", "converge", backbone, "fp32", extra if label == "default" else
                               [e for e in extra if "anchors" in e])  # torchvision has no CIoU option
            report["convergence"][label] = {"ours fp32": ours, "torchvision fp32": theirs}
            line = (f"[converge {label}, {backbone}, {args.converge_iters} iters] AP {ours['AP']:.3f} vs "
                    f"{theirs['AP']:.3f}; AP50 {ours['AP50']:.3f} vs {theirs['AP50']:.3f}")
            if "segm_AP" in ours:
                line += f"; segm AP {ours['segm_AP']:.3f} vs {theirs.get('segm_AP', float('nan')):.3f}"
            if with_amp and label == "default":
                amp = run_child(args, "rcnn_trainer", "converge", backbone, "amp", extra)
                report["convergence"][label]["ours amp"] = amp
                line += f"; ours AMP AP {amp['AP']:.3f} AP50 {amp['AP50']:.3f}"
            print(line, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
