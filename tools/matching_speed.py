"""Matching + sampling time per training step: torchvision's per-image code vs ours batched.

  python tools/matching_speed.py --threads 2

Both run on the same model, anchors, GT boxes and proposals (`--only NAME-PREFIX` picks settings): the RPN's anchor matching and
balanced sampling (torchvision: assign_targets_to_anchors + fg_bg_sampler; ours:
RPN.assign_targets + sample_balanced) and the RoI head's proposal matching and sampling
(torchvision: add_gt_proposals + assign_targets_to_proposals + subsample + gather; ours:
BoxHeads._sample). Two settings: config.yaml's sizes, and torchvision's defaults at 320 px.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models.detection.image_list import ImageList

from rcnn_trainer.config_loader import load_config
from rcnn_trainer.engine.data_settings import resolve_head_size
from rcnn_trainer.model.build import build_model
from rcnn_trainer.model.matching import sample_balanced

SETTINGS = {  # name -> (image side, batch, proposals per image after NMS, overrides)
    "config.yaml (128 px, batch 8, 150 proposals, 64 RoIs)": (128, 8, 150, []),
    "torchvision's sizes (320 px, batch 4, 2000 proposals, 512 RoIs)": (
        320, 4, 2000, ["model.rpn.batch_size_per_image=256", "model.roi.batch_size_per_image=512",
                       "model.roi.positive_fraction=0.25"]),
    # what GPU users run (the re-measure): 800 px, batch 8, 2000 proposals, 512 RoIs
    "GPU sizes (800 px, batch 8, 2000 proposals, 512 RoIs)": (
        800, 8, 2000, ["model.rpn.batch_size_per_image=256", "model.roi.batch_size_per_image=512",
                       "model.roi.positive_fraction=0.25"]),
}


def random_boxes(count: int, side: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=generator) * side * 0.8
    wh = 4 + torch.rand(count, 2, generator=generator) * side * 0.3
    return torch.cat([xy, xy + wh], dim=1)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--objects", type=int, default=6, help="GT boxes per image")
    p.add_argument("--only", nargs="*", default=None, help="settings whose name starts with one of these")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print("| setting | RPN: torchvision / ours (ms) | RoI: torchvision / ours (ms) |")
    print("|---|---|---|")
    for name, (side, batch, num_proposals, overrides) in SETTINGS.items():
        if args.only and not any(name.startswith(prefix) for prefix in args.only):
            continue
        cfg = load_config("config.yaml", overrides + [f"data.min_size={side}", f"data.max_size={side}",
                                                      "model.num_classes=4",
                                                      "model.anchors.sizes=[[16],[32],[64],[128],[256]]"])
        cfg = resolve_head_size(cfg, lambda _: None)  # config.yaml's head sizes are `auto`
        model = build_model(cfg.model).train()
        rpn, heads = model.rpn, model.roi_heads
        images = ImageList(torch.zeros(batch, 3, side, side), [(side, side)] * batch)
        features = [torch.zeros(batch, 1, side // s, side // s) for s in (4, 8, 16, 32, 64)]
        anchors = rpn.anchor_generator(images, features)
        targets = [{"boxes": random_boxes(args.objects, side, g), "labels": torch.randint(1, 5, (args.objects,), generator=g)}
                   for _ in range(batch)]
        proposals = [random_boxes(num_proposals, side, g) for _ in range(batch)]
        gt_boxes, gt_labels = [t["boxes"] for t in targets], [t["labels"] for t in targets]

        def rpn_torchvision():
            rpn.fg_bg_sampler(rpn.assign_targets_to_anchors(anchors, targets)[0])

        def rpn_ours():
            labels, _ = rpn.assign_targets(torch.stack(anchors), targets)
            sample_balanced(labels, rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction)

        def roi_torchvision():
            with_gt = heads.add_gt_proposals(proposals, gt_boxes)
            matched, labels = heads.assign_targets_to_proposals(with_gt, gt_boxes, gt_labels)
            kept = heads.subsample(labels)
            [(p[k], l[k], m[k]) for p, l, m, k in zip(with_gt, labels, matched, kept)]

        def roi_ours():
            heads._sample(proposals, targets, None, None)

        times = [median_ms(fn, args.repeats) for fn in (rpn_torchvision, rpn_ours, roi_torchvision, roi_ours)]
        print(f"| {name} | {times[0]:.1f} / {times[1]:.1f} | {times[2]:.1f} / {times[3]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
