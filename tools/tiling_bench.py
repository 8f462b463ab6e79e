"""Large images with small objects: training on tiles + sliced inference against the same
model trained and run on whole images, and against torchvision's FasterRCNN on the same tiles.

  python tools/tiling_bench.py --out /tmp/tiling_bench          # needs scikit-learn (".[bench]")

Data: scikit-learn's handwritten digit scans (first --classes digits), 14-30 px tall, composited
in random colours onto --canvas px textured scenes (tools/bench_datasets.py's compose), 20-40
per scene; train and val use disjoint scans. Every run gets the same iterations and batch size:
  (a) ours, data.tiling {size: --tile, overlap 0.2}, min_size = max_size = --tile (objects keep
      their pixels), sliced inference (tiles + whole image), merged greedily and by NMS;
  (b) ours on the whole images resized to min_size = max_size = --whole, whole-image inference;
  (c) model (b) with the sliced inference of (a);
  (d) torchvision's FasterRCNN (resnet18-FPN from scratch, trainable BatchNorm, the anchors (a)
      fitted, proposal counts as ours), trained on the tiles (a) trains on, each lr of --tv-lrs
      (SGD momentum 0.9, warmup), the best one predicted with the same slicing.
Sliced inference time per image is measured for (a) and (d) on the same tiles, fp32 both, one
process, side by side; AP / AP50 are COCO's on the original val images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_datasets import compose, tight  # noqa: E402

from rcnn_trainer.config_loader import load_config  # noqa: E402
from rcnn_trainer.data.loader import build_dataset, build_eval_loader, build_train_loader  # noqa: E402
from rcnn_trainer.infer.evaluate import coco_metrics, predict, to_coco_results  # noqa: E402
from rcnn_trainer.infer.run_eval import inference_model  # noqa: E402
from rcnn_trainer.infer.sliced import SlicedModel, sliced_eval  # noqa: E402
from rcnn_trainer.runtime.checkpoint import load_checkpoint  # noqa: E402


def make_data(out: Path, canvas: int, num_train: int, num_val: int, classes: int, seed: int) -> Path:
    if (out / "val.json").exists():
        return out
    from sklearn.datasets import load_digits
    from PIL import Image

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    cut = int(0.75 * len(order))
    pools = {"train": order[:cut], "val": order[cut:]}
    categories = [{"id": c + 1, "name": str(c)} for c in range(classes)]
    frequencies = np.full(classes, 1.0 / classes)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        by_class = [[i for i in pools[split] if digits.target[i] == c] for c in range(classes)]

        def render(label, rng, by_class=by_class):
            scan = digits.images[rng.choice(by_class[label])] / 16.0
            height = int(rng.uniform(14, 30))
            width = max(6, int(height * rng.uniform(0.7, 1.0)))
            return tight(Image.fromarray((scan * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC))
        compose(out, split, count, canvas, rng, categories, frequencies, lambda r: int(r.integers(20, 41)),
                render, empty_share=0.0)
    return out


def base_config(data: Path, run: Path, args, tiled: bool) -> dict:
    side = args.tile if tiled else args.whole
    split = lambda s: {"ann_file": str(data / f"{s}.json"), "img_dir": str(data / "images")}  # noqa: E731
    return {
        "seed": 0, "output_dir": str(run),
        "data": {"train": split("train"), "val": split("val"), "batch_size": args.batch, "num_workers": 2,
                 "min_size": side, "max_size": side, "hflip_prob": 0.0,
                 "tiling": {"size": args.tile, "overlap": 0.2} if tiled else None},
        "model": {"backbone": {"name": "resnet18", "weights": None, "norm": "bn"},
                  "rpn": {"batch_size_per_image": 128, "pre_nms_top_n_train": 300, "post_nms_top_n_train": 150,
                          "pre_nms_top_n_test": 300, "post_nms_top_n_test": 100}},
        "solver": {"optimizer": "adamw", "amp": True, "lr": 0.001, "weight_decay": 0.0001, "warmup_iters": 50,
                   "schedule": "cosine", "max_iters": args.iters},
        "train": {"log_period": 50, "eval_period": 0, "checkpoint_period": 10000, "threads": 2},
    }


def train_ours(data: Path, out: Path, args, tiled: bool):
    from rcnn_trainer.cli import train_main

    run = out / ("tiled" if tiled else "whole")
    config = run.parent / f"{run.name}.yaml"
    config.write_text(yaml.safe_dump(base_config(data, run, args, tiled), sort_keys=False))
    start = time.perf_counter()
    if not (run / "model_final.pth").exists():
        assert train_main(["--config", str(config), "--no-progress"]) == 0
    seconds = time.perf_counter() - start
    cfg = load_config(run / "config.yaml")  # the resolved one (anchors, head sizes)
    path = run / "model_final.pth"
    return cfg, inference_model(cfg, load_checkpoint(path), path, torch.device("cpu")), seconds


def score(model, cfg, val_set, sliced: SlicedModel | None = None) -> dict:
    """AP, AP50 on the original val images and seconds per image (one process, fp32); `sliced`:
    through that SlicedModel, the images read at full resolution."""
    loader = build_eval_loader(cfg.with_settings({"data.num_workers": 0}), val_set)
    if sliced is not None:
        _, loader = sliced_eval(cfg, model, loader)  # the full-resolution loader (cfg has data.tiling)
        model = sliced
    start = time.perf_counter()
    predictions = predict(model, loader, torch.device("cpu"), progress=False)
    seconds = (time.perf_counter() - start) / len(val_set)
    metrics = coco_metrics(val_set, to_coco_results(predictions, val_set.label_to_cat_id))
    return {"AP": metrics["AP"], "AP50": metrics["AP50"], "s_per_image": seconds}


class TorchvisionAdapter(nn.Module):
    """torchvision's detector with our inference signature (boxes mapped to original_sizes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, original_sizes=None, masks=True):
        from torchvision.models.detection.transform import resize_boxes

        out = self.model(images)
        for det, image, size in zip(out, images, original_sizes):
            det["boxes"] = resize_boxes(det["boxes"], tuple(image.shape[-2:]), size)
        return out


def torchvision_model(cfg, num_classes: int, tile: int) -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   norm_layer=nn.BatchNorm2d)  # trainable BN: from scratch, frozen BN is identity
    anchors = AnchorGenerator(tuple(tuple(int(s) for s in level) for level in cfg.model.anchors.sizes),
                              (tuple(cfg.model.anchors.aspect_ratios),) * len(cfg.model.anchors.sizes))
    return FasterRCNN(backbone, num_classes=num_classes + 1, rpn_anchor_generator=anchors, min_size=tile,
                      max_size=tile, rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150,
                      rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, rpn_batch_size_per_image=128,
                      box_batch_size_per_image=128)


def train_torchvision(cfg, train_set, lr: float, iters: int) -> tuple[nn.Module, float]:
    torch.manual_seed(0)
    model = torchvision_model(cfg, cfg.model.num_classes, cfg.data.tiling.size).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / 50) * 0.5 * (1 + np.cos(np.pi * i / iters)))
    start = time.perf_counter()
    for step, (images, targets) in enumerate(build_train_loader(cfg, train_set)):  # the same tiles as (a)
        if step >= iters:
            break
        losses = model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        total = sum(losses.values())
        optimizer.zero_grad()
        if torch.isfinite(total):
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
        schedule.step()
    return TorchvisionAdapter(model).eval(), time.perf_counter() - start


def sliced_for(model, cfg, merge: str) -> SlicedModel:
    tiling = cfg.data.tiling
    return SlicedModel(model, size=tiling.size, overlap=tiling.overlap, whole_image=tiling.whole_image,
                       min_size=cfg.data.test_min_size, max_size=cfg.data.max_size, merge=merge,
                       merge_thresh=tiling.merge_thresh, nms_thresh=cfg.model.roi.nms_thresh,
                       batch_size=cfg.data.batch_size)


def predict_100mp(out: Path, side: int = 10000) -> None:
    """Peak RSS of `rcnn-predict` (the tiled run's config and checkpoint) on a generated side x side
    RGB image, read with resource.getrusage of the child process."""
    import resource
    import subprocess

    from PIL import Image

    big = out / f"big_{side}.png"
    if not big.exists():
        ramp = np.linspace(0, 255, side, dtype=np.float32)
        pixels = np.empty((side, side, 3), np.uint8)
        pixels[..., 0] = ramp[None, :].astype(np.uint8)
        pixels[..., 1] = ramp[:, None].astype(np.uint8)
        pixels[..., 2] = 128
        Image.fromarray(pixels).save(big, compress_level=1)
        del pixels
    # the tiled run's model, its tiles 1024 px resized to its 256 px input: 121 views instead of 2,401
    # (the time, not the memory: a batch of views is the same size either way)
    raw = yaml.safe_load((out / "tiled" / "config.yaml").read_text())
    raw["data"]["tiling"]["size"] = 1024
    (out / "predict_100mp.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rcnn_trainer.cli", "predict", "--config", str(out / "predict_100mp.yaml"),
                           "--checkpoint", str(out / "tiled" / "model_final.pth"), str(big), "--output-dir",
                           str(out / "predict_100mp"), "--no-draw", "--no-progress", "--overwrite"],
                          capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(done.stdout.strip().splitlines()[-1:] or done.stderr[-2000:])
    print(f"rcnn-predict on a {side} x {side} image ({side * side / 1e6:.0f} MP, {big.stat().st_size / 1e6:.0f} MB PNG): "
          f"exit {done.returncode}, {time.perf_counter() - start:.0f} s, peak RSS {peak:.0f} MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/tiling_bench"))
    p.add_argument("--canvas", type=int, default=1280)
    p.add_argument("--train", type=int, default=12)
    p.add_argument("--val", type=int, default=4)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--whole", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--tv-lrs", type=float, nargs="+", default=[0.01, 0.02])
    p.add_argument("--predict-100mp", action="store_true", help="only: peak RSS of rcnn-predict on 10000 x 10000")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.predict_100mp:
        return predict_100mp(args.out)
    data = make_data(args.out / "data", args.canvas, args.train, args.val, args.classes, seed=0)
    rows = {}
    tiled_cfg, tiled_model, a_time = train_ours(data, args.out, args, tiled=True)
    whole_cfg, whole_model, b_time = train_ours(data, args.out, args, tiled=False)
    val_set = build_dataset(tiled_cfg, "val", for_eval=True)
    for merge in ("greedy", "nms"):
        rows[f"(a) ours tiled, sliced ({merge})"] = {**score(tiled_model, tiled_cfg, val_set,
                                                              sliced_for(tiled_model, tiled_cfg, merge)),
                                                     "train_s": a_time}
    rows["(b) ours whole image"] = {**score(whole_model, whole_cfg, build_dataset(whole_cfg, "val", for_eval=True)),
                                    "train_s": b_time}
    rows["(c) model (b), sliced (greedy)"] = {**score(whole_model, tiled_cfg, val_set,
                                                      sliced_for(whole_model, tiled_cfg, "greedy")), "train_s": b_time}
    train_set = build_dataset(tiled_cfg, "train")
    best = None
    for lr in args.tv_lrs:
        model, seconds = train_torchvision(tiled_cfg, train_set, lr, args.iters)
        row = {**score(model, tiled_cfg, val_set, sliced_for(model, tiled_cfg, "greedy")), "train_s": seconds}
        rows[f"(d) torchvision tiles lr {lr:g}, sliced (greedy)"] = row
        if best is None or row["AP"] > best[1]["AP"]:
            best = (model, row, lr)
    # time per image of sliced inference, side by side, fp32 both, same tiles and batch
    ours_s = score(tiled_model, tiled_cfg, val_set, sliced_for(tiled_model, tiled_cfg, "greedy"))["s_per_image"]
    tv_s = score(best[0], tiled_cfg, val_set, sliced_for(best[0], tiled_cfg, "greedy"))["s_per_image"]
    print(f"\n{args.canvas} px canvases ({args.train} train, {args.val} val), digits 14-30 px, {args.classes} classes; "
          f"{args.iters} iterations x batch {args.batch}; tiles {args.tile} px overlap 0.2, whole images at {args.whole}")
    print(f"{'run':48s} {'AP':>6s} {'AP50':>6s} {'train s':>8s} {'s/img infer':>11s}")
    for name, r in rows.items():
        print(f"{name:48s} {r['AP']:6.3f} {r['AP50']:6.3f} {r['train_s']:8.0f} {r['s_per_image']:11.2f}")
    a = rows["(a) ours tiled, sliced (greedy)"]
    a_best = max(rows["(a) ours tiled, sliced (greedy)"]["AP"], rows["(a) ours tiled, sliced (nms)"]["AP"])
    print(f"tiled - whole: {a_best - rows['(b) ours whole image']['AP']:+.3f} AP; tiled - torchvision best "
          f"(lr {best[2]:g}): {a_best - best[1]['AP']:+.3f} AP")
    print(f"sliced inference, s per image (fp32, same tiles): ours {ours_s:.2f}, torchvision {tv_s:.2f}, "
          f"ratio ours/torchvision {ours_s / tv_s:.2f}")
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "ours_s": ours_s, "tv_s": tv_s, "a": a}, indent=1))


if __name__ == "__main__":
    main()
