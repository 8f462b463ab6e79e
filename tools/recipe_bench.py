"""Recipe benchmark: a rcnn_trainer recipe vs torchvision's standard Faster R-CNN recipe, on
several datasets, at the same image size, batch and number of iterations.

  pip install -c constraints.txt -e ".[dev,bench]"
  python tools/recipe_bench.py --recipe config.yaml --iters 300 --batch 4 --out recipe_bench.json

Datasets (tools/bench_datasets.py writes all but synthetic, once, under --data-dir):
  digits     real handwritten digits (scikit-learn), 10 classes, 320 px, 12-56 px objects, 1-8 per image
  glyphs     letters of the installed TrueType fonts, 26 classes, 256 px, 8-150 px objects, 0-20 per image
  synthetic  the built-in shapes, 4 classes, 128 px (config.yaml's data.synthetic)
  digits_large, glyphs_large (on request): 5 digits / 6 letters, 256 px, 28-84 / 24-100 px objects

Ours: the real `rcnn-train` command on the recipe with only the data, size, batch and
iterations overridden (num_classes and anchors come from the data, as for a user), so the
monitor, preflight and evaluation all run as they would for a user.
torchvision: `torchvision.models.detection.FasterRCNN` with its default RPN/RoI settings
(2000/1000 proposals, 512 RoIs at 0.25, 256-channel FPN, 1024-wide head), resnet18-FPN from
scratch with trainable BatchNorm, the same anchors as ours, and the reference script's
recipe: SGD lr 0.02 x batch/16 ... (see TORCHVISION_RECIPE), momentum 0.9, weight decay 1e-4,
linear warmup over the first epoch (at most 1000 iterations) and x0.1 at 16/26 and 22/26 of
training. Both are scored by the same COCO evaluation on the same val split, and both train in
fp32: torchvision's loop has no autocast, and the recipe's `solver.amp` would make the
comparison depend on the CPU (bf16 on AMX / AVX512-BF16, fp32 on AVX2); --ours-amp keeps it.
Each training run is a subprocess; results are cached in --out, so rerunning with another
recipe reuses the torchvision runs (pass --fresh to run them again).

--masks trains instance masks on both sides (Mask R-CNN: our `model.mask.enabled=true`;
torchvision's MaskRCNN with its 4 x 256 mask head) and reports segm AP beside box AP.
--tv-lr-scales runs torchvision at several multiples of its reference lr and keeps the best
(by segm AP with masks, else AP): its best recipe at this budget, all runs in --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_datasets  # noqa: E402  (tools/ is not a package)

# name -> native image side; by default the three of the harness, the easier variants on request
DATASETS = {**{name: spec.size for name, spec in bench_datasets.SPECS.items()}, "synthetic": 128}
DEFAULT_DATASETS = ["digits", "glyphs", "synthetic"]
# The reference recipe (torchvision/references/detection, README: lr 0.02 for 8 GPUs x 2 images).
# lr scales linearly with the batch, as the reference's --lr note says (0.02 / 16 per image).
TORCHVISION_RECIPE = {"lr_per_image": 0.02 / 16, "momentum": 0.9, "weight_decay": 1e-4, "warmup_factor": 1e-3,
                      "milestones": (16 / 26, 22 / 26), "gamma": 0.1}


def data_overrides(name: str, data_dir: Path, batch: int, iters: int, seed: int, size: int | None = None) -> list[str]:
    """`size`: the images' side in training and evaluation (default: the dataset's own)."""
    size = size or DATASETS[name]
    common = [f"data.batch_size={batch}", f"data.min_size={size}", f"data.max_size={size}",
              f"solver.max_iters={iters}", f"seed={seed}"]
    if name == "synthetic":
        return ["data.synthetic={num_train: 300, num_val: 60, image_size: 128, seed: 0}", *common]
    if not bench_datasets.SPECS[name].mirror_safe:  # both sides: what a user of such data would set
        common.append("data.hflip_prob=0")
    folder = bench_datasets.ensure(name, data_dir / name)
    return [f"data.train={{ann_file: '{folder / 'train.json'}', img_dir: '{folder / 'images'}'}}",
            f"data.val={{ann_file: '{folder / 'val.json'}', img_dir: '{folder / 'images'}'}}", *common]


def resolved_model_settings(recipe: str, overrides: list[str]) -> list[str]:
    """num_classes and anchor sizes as our trainer resolves them from the data (`auto`), as
    overrides, so that torchvision gets the same anchors."""
    from rcnn_trainer.config_loader import load_config
    from rcnn_trainer.data.loader import build_dataset
    from rcnn_trainer.data.settings import resolve_from_data

    cfg = load_config(recipe, overrides)
    cfg = resolve_from_data(cfg, build_dataset(cfg, "train"), lambda _: None)
    return [f"model.anchors.sizes={cfg.model.anchors.sizes}", f"model.num_classes={cfg.model.num_classes}"]


# --------------------------------------------------------------------------- ours
def run_ours(recipe: str, overrides: list[str], threads: int, workdir: Path) -> dict:
    out = workdir / "ours"
    cmd = [sys.executable, "-m", "rcnn_trainer.cli", "train", "--config", recipe, "--output-dir", str(out),
           "--no-progress", f"train.threads={threads}", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"rcnn-train failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [r for r in records if r["type"] == "eval"][-1]
    times = [r["time"] for r in records if r["type"] == "train"]
    alarms = [f"{r['name']}@{r['iter']}" for r in records if r["type"] == "alarm"]
    return {"AP": final["AP"], "AP50": final["AP50"], "APs": final["APs"], "wall_s": wall,
            **{k: final[k] for k in ("segm_AP", "segm_AP50") if k in final},
            "s_per_iter": statistics.median(times), "alarms": alarms,
            "log_tail": proc.stdout.splitlines()[-12:]}


# --------------------------------------------------------------------------- torchvision
def torchvision_child(recipe: str, overrides: list[str], threads: int, lr_scale: float = 1.0,
                      heads: str = "torchvision") -> dict:
    import torch

    from benchmark import TorchvisionFasterRCNN
    from rcnn_trainer.config import BackboneConfig, MaskConfig, ROIConfig, RPNConfig
    from rcnn_trainer.config_loader import load_config
    from rcnn_trainer.data.loader import build_dataset, build_eval_loader, build_train_loader
    from rcnn_trainer.data.settings import resolve_from_data
    from rcnn_trainer.runtime.device import to_device
    from rcnn_trainer.infer.evaluate import evaluate
    from rcnn_trainer.model.build import build_model

    torch.set_num_threads(threads)
    # The recipe's data settings (size, batch, flips) and the anchors and num_classes ours
    # resolved (in the overrides); a from-scratch resnet18-FPN with trainable BatchNorm, and
    # heads="torchvision": torchvision's default sizes for the rest (our schema's defaults are
    # torchvision's); heads="ours": the sizes our recipe resolves (FPN width, proposals, RoIs,
    # head widths, mask convs), i.e. identical settings but for torchvision's own losses,
    # sampler and optimizer recipe.
    cfg = load_config(recipe, overrides)
    if heads == "torchvision":
        cfg.model.backbone = BackboneConfig(name="resnet18", weights=None, norm="bn")
        cfg.model.rpn, cfg.model.roi = RPNConfig(), ROIConfig()
        if cfg.model.mask.enabled:  # torchvision's MaskRCNN head: 4 convs of 256
            cfg.model.mask = MaskConfig(enabled=True)
    else:
        backbone = cfg.model.backbone
        cfg.model.backbone = BackboneConfig(name="resnet18", weights=None, norm="bn", fpn_channels=backbone.fpn_channels)
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    cfg = resolve_from_data(cfg, train_set, lambda _: None)  # the `auto` head sizes, as ours resolves them
    torch.manual_seed(cfg.seed)
    model = TorchvisionFasterRCNN(build_model(cfg.model), cfg).train()
    batch, iters = cfg.data.batch_size, cfg.solver.max_iters
    r = TORCHVISION_RECIPE
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=r["lr_per_image"] * batch * lr_scale,
                                momentum=r["momentum"], weight_decay=r["weight_decay"])
    warmup = min(1000, max(1, len(train_set) // batch - 1))
    milestones = [int(m * iters) for m in r["milestones"]]

    def factor(it: int) -> float:
        decay = r["gamma"] ** sum(it >= m for m in milestones)
        if it < warmup:
            return decay * (r["warmup_factor"] * (1 - it / warmup) + it / warmup)
        return decay

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    batches = iter(build_train_loader(cfg, train_set))
    device = torch.device("cpu")
    times = []
    t_start = time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        losses, _ = model(*to_device(*next(batches), device))
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(total):
            total.backward()
            optimizer.step()
        scheduler.step()
        times.append(time.perf_counter() - t0)
    metrics, _ = evaluate(model, val_set, build_eval_loader(cfg, val_set), device, cfg.monitor.score_thresholds,
                          progress=False)
    return {"AP": metrics["AP"], "AP50": metrics["AP50"], "APs": metrics["APs"],
            "wall_s": time.perf_counter() - t_start, "s_per_iter": statistics.median(times),
            "anchors": cfg.model.anchors.sizes, "lr_scale": lr_scale, "heads": heads,
            **{k: metrics[k] for k in ("segm_AP", "segm_AP50") if k in metrics}}


def run_torchvision(recipe: str, overrides: list[str], threads: int, lr_scale: float = 1.0,
                    heads: str = "torchvision") -> dict:
    cmd = [sys.executable, __file__, "--child", "--recipe", recipe, "--threads", str(threads),
           "--lr-scale", str(lr_scale), "--tv-heads", heads, "--", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"torchvision run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- report
def format_table(rows: list[dict]) -> str:
    segm = all("segm_AP" in row["ours"] for row in rows)
    lines = ["| dataset | AP ours / tv | AP50 ours / tv | APs ours / tv | AP gain |"
             + (" segm AP ours / tv | segm AP gain |" if segm else "") + " wall s ours / tv | s/iter ours / tv |",
             "|---|---|---|---|---|" + ("---|---|" if segm else "") + "---|---|"]
    for row in rows:
        o, t = row["ours"], row["torchvision"]
        masks = (f" {o['segm_AP']:.3f} / {t['segm_AP']:.3f} | {o['segm_AP'] - t['segm_AP']:+.3f} |" if segm else "")
        lines.append(f"| {row['dataset']} | {o['AP']:.3f} / {t['AP']:.3f} | {o['AP50']:.3f} / {t['AP50']:.3f} | "
                     f"{o['APs']:.3f} / {t['APs']:.3f} | {o['AP'] - t['AP']:+.3f} |{masks} {o['wall_s']:.0f} / "
                     f"{t['wall_s']:.0f} | {o['s_per_iter']:.2f} / {t['s_per_iter']:.2f} |")
    return "\n".join(lines)


def best_torchvision(runs: list[dict]) -> dict:
    """The lr that scored best (segm AP with masks, else AP), with every run's score beside it."""
    score = "segm_AP" if all("segm_AP" in r for r in runs) else "AP"
    best = dict(max(runs, key=lambda r: r[score]))
    best["lr_sweep"] = {str(r["lr_scale"]): {k: r[k] for k in ("AP", "segm_AP", "s_per_iter") if k in r}
                        for r in runs}
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="config.yaml", help="our recipe (a config file)")
    p.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, choices=list(DATASETS))
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    p.add_argument("--out", type=Path, default=Path("recipe_bench.json"))
    p.add_argument("--fresh", action="store_true", help="rerun torchvision even if --out has its result")
    p.add_argument("--only", choices=["ours", "torchvision"], help="run one side only (tuning; caching torchvision)")
    p.add_argument("--keep-runs", type=Path, help="keep our run folders under DIR/<dataset>/ours (else a temp dir)")
    p.add_argument("--size", type=int, help="train and evaluate at this image side (default: each dataset's own)")
    p.add_argument("--masks", action="store_true", help="instance masks on both sides (Mask R-CNN)")
    p.add_argument("--tv-lr-scales", type=float, nargs="+", default=[1.0],
                   help="torchvision at these multiples of its reference lr; the best is compared")
    p.add_argument("--tv-heads", choices=["torchvision", "ours"], default="torchvision",
                   help="torchvision's default head sizes, or the sizes our recipe resolves (identical settings)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lr-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--ours-amp", action="store_true",
                   help="train ours with the recipe's solver.amp (default: fp32, as torchvision's side)")
    p.add_argument("overrides", nargs="*", help="extra overrides for our recipe only")
    args = p.parse_args()
    if args.child:
        result = torchvision_child(args.recipe, args.overrides, args.threads, args.lr_scale, args.tv_heads)
        print("RESULT " + json.dumps(result), flush=True)
        return
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {"torchvision": {}}
    report = {"recipe": args.recipe, "iters": args.iters, "batch": args.batch, "threads": args.threads,
              "overrides": args.overrides, "ours_precision": "recipe's solver.amp" if args.ours_amp else "fp32", "rows": [], "torchvision": previous.get("torchvision", {})}
    for name in args.datasets:
        overrides = data_overrides(name, args.data_dir, args.batch, args.iters, args.seed, args.size)
        overrides += ["model.mask.enabled=true"] if args.masks else []
        shared = resolved_model_settings(args.recipe, overrides + args.overrides)
        # every setting torchvision's run depends on (not the data paths: the dataset's name says it)
        settings = [o for o in overrides + shared if not o.startswith(("data.train=", "data.val="))]
        key = (f"{name}/threads={args.threads}/" + (f"lr_scales={args.tv_lr_scales}/" if args.tv_lr_scales != [1.0] else "")
               + (f"heads={args.tv_heads}/" if args.tv_heads != "torchvision" else "") + " ".join(settings))
        ours_overrides = overrides + ([] if args.ours_amp else ["solver.amp=false"]) + args.overrides
        if args.only != "torchvision":
            # our run folder kept under --keep-runs (metrics.jsonl, log, checkpoints, to read its alarms), else a temp dir
            with (contextlib.nullcontext(args.keep_runs / name) if args.keep_runs else tempfile.TemporaryDirectory()) as run_dir:
                ours = run_ours(args.recipe, ours_overrides, args.threads, Path(run_dir))
            print(f"[{name}] ours: AP {ours['AP']:.3f} AP50 {ours['AP50']:.3f} APs {ours['APs']:.3f} "
                  + (f"segm AP {ours['segm_AP']:.3f} " if "segm_AP" in ours else "") +
                  f"{ours['s_per_iter']:.2f} s/it, {ours['wall_s']:.0f} s; alarms: "
                  f"{', '.join(ours['alarms']) or 'none'}", flush=True)
        if args.only == "ours":
            continue
        if key not in report["torchvision"] or args.fresh:
            runs = []
            for scale in args.tv_lr_scales:
                runs.append(run_torchvision(args.recipe, overrides + shared, args.threads, scale, args.tv_heads))
                print(f"[{name}] torchvision lr x{scale:g}: AP {runs[-1]['AP']:.3f}"
                      + (f" segm AP {runs[-1]['segm_AP']:.3f}" if "segm_AP" in runs[-1] else "")
                      + f" {runs[-1]['s_per_iter']:.2f} s/it", flush=True)
            report["torchvision"][key] = best_torchvision(runs)
        theirs = report["torchvision"][key]
        print(f"[{name}] torchvision (lr x{theirs.get('lr_scale', 1.0):g}): AP {theirs['AP']:.3f} "
              f"AP50 {theirs['AP50']:.3f} APs {theirs['APs']:.3f} "
              f"{theirs['s_per_iter']:.2f} s/it, {theirs['wall_s']:.0f} s", flush=True)
        if args.only == "torchvision":
            args.out.write_text(json.dumps(report, indent=1))
            continue
        report["rows"].append({"dataset": name, "ours": ours, "torchvision": theirs})
        args.out.write_text(json.dumps(report, indent=1))
    if report["rows"]:
        print(format_table(report["rows"]))
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
