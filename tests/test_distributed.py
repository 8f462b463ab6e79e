"""DDP on CPU: 2 gloo processes on loopback.

A step on a fixed global batch split over 2 ranks gives the same loss (mean over ranks) and
the same gradients as 1 process on the whole batch: the avg_factor is averaged across ranks
before dividing. Sampling is made exhaustive so both runs see the same anchors and RoIs, and
GroupNorm replaces BatchNorm (whose batch statistics differ per rank by design).
"""

from __future__ import annotations

import math

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_config, tiny_dict, write_yaml
from rcnn_trainer.runtime import checkpoint as ckpt_io
from rcnn_trainer.train.metrics_log import MetricsLog
from rcnn_trainer.losses.weighting import weighted_total
from rcnn_trainer.model.build import build_loss_weights, build_model

PARITY = {"backbone": {"norm": "gn"},
          "rpn": {"batch_size_per_image": 100000, "positive_fraction": 1.0},
          "roi": {"batch_size_per_image": 100000, "positive_fraction": 1.0}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch(masks: bool = False, empty_first_rank: bool = False):
    """4 images with 1..4 objects (with masks: the box's inscribed ellipse); optionally the first
    rank's two images without any object."""
    g = torch.Generator().manual_seed(7)
    images, targets = [], []
    yy, xx = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    for i in range(4):
        images.append(torch.rand(3, 64, 64, generator=g))
        n = 0 if empty_first_rank and i < 2 else i + 1
        xy = torch.rand(n, 2, generator=g) * 40
        target = {"boxes": torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 12], 1),
                  "labels": torch.randint(1, 5, (n,), generator=g)}
        if masks:
            b = target["boxes"]
            cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            rx, ry = (b[:, 2] - b[:, 0]) / 2, (b[:, 3] - b[:, 1]) / 2
            inside = ((xx - cx[:, None, None]) / rx[:, None, None]) ** 2 + ((yy - cy[:, None, None]) / ry[:, None, None]) ** 2
            target["masks"] = (inside <= 1).to(torch.uint8)
        targets.append(target)
    return images, targets


def one_step(model, images, targets, weights):
    losses, _ = model(images, targets)
    total, _ = weighted_total(losses, weights)
    total.backward()
    return {k: float(v.detach()) for k, v in losses.items()}


def _worker(rank, world, port, cfg, out_dir, empty_first_rank=False):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(build_model(cfg.model).train())
    images, targets = global_batch(cfg.model.mask.enabled, empty_first_rank)
    per_rank = len(images) // world
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    losses = one_step(model, images[sl], targets[sl], build_loss_weights(cfg.model).final())
    grads = {n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None}
    torch.save({"losses": losses, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("masks, empty_first_rank", [(False, False), (True, False), (True, True)])
def test_two_ranks_match_one_process(tmp_path, masks, empty_first_rank):
    """With masks, the mask avg_factor (positive RoIs) is averaged across ranks too, also when one
    rank's images hold no object at all (its mask loss is 0, its gradient still in the graph)."""
    mask = {"mask": {"enabled": True, "num_convs": 1, "conv_channels": 16}} if masks else {}
    cfg = tiny_config(tmp_path, model={**PARITY, **mask})
    mp.spawn(_worker, args=(2, free_port(), cfg, str(tmp_path), empty_first_rank), nprocs=2, join=True)
    torch.manual_seed(0)
    single = build_model(cfg.model).train()
    images, targets = global_batch(masks, empty_first_rank)
    expected = one_step(single, images, targets, build_loss_weights(cfg.model).final())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ("loss_roi_mask" in expected) == masks
    for name, value in expected.items():
        mean = sum(r["losses"][name] for r in ranks) / 2
        assert abs(mean - value) <= 1e-4 * max(1.0, abs(value)), (name, mean, value)
    for name, param in single.named_parameters():
        if param.grad is None:
            continue
        for r in ranks:  # DDP leaves the same averaged gradient on every rank
            assert torch.allclose(r["grads"][name], param.grad, rtol=1e-3, atol=1e-6), name


def torchrun(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "rcnn_trainer.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_trains_checkpoints_resumes_and_evaluates(tmp_path):
    # with the EMA and an evaluation mid-run: the val loss and the average's broadcast are collectives too
    raw = tiny_dict(tmp_path, solver={"max_iters": 4, "ema": {"enabled": True, "decay": 0.9, "warmup": 2}},
                    train={"threads": 1, "checkpoint_period": 2, "eval_period": 2})
    config = write_yaml(tmp_path / "c.yaml", raw)
    proc = torchrun("train", "--config", str(config), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    lines = MetricsLog(run / "metrics.jsonl").read()
    assert [l["iter"] for l in lines if l["type"] == "train"] == [1, 2, 3, 4]  # rank 0 alone writes
    ckpt = ckpt_io.load_checkpoint(run / "model_final.pth")
    assert ckpt["iteration"] == 4 and len(ckpt["rng"]) == 2  # every rank's RNG state
    assert ckpt["ema"]["updates"] == 4
    evals = [l for l in lines if l["type"] == "eval"]
    assert [l["iter"] for l in evals] == [2, 4] and all("val/loss" in l and "raw/AP" in l for l in evals)

    proc = torchrun("train", "--config", str(config), "--resume", "--no-progress", "solver.max_iters=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "continuing from" in proc.stdout + proc.stderr
    assert ckpt_io.load_checkpoint(run / "model_final.pth")["iteration"] == 6
    evals = [l for l in MetricsLog(run / "metrics.jsonl").read() if l["type"] == "eval"]
    assert evals and "AP50" in evals[-1]

    proc = subprocess.run([sys.executable, "-m", "rcnn_trainer.cli", "eval", "--config", str(config), "--checkpoint",
                           str(run / "model_final.pth"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "AP50" in proc.stdout, proc.stderr[-2000:]


def _empty_rank_worker(rank, world, port, raw, out_dir):
    """Rank 1's images have no objects; every box loss type must still finish the step (every
    collective runs on every rank). Each avg_factor is recorded with the rank's own count."""
    from rcnn_trainer.config_loader import validate_config
    from rcnn_trainer.losses import heads

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    factors, real_factor = [], heads.avg_factor_from_count

    def recorded_factor(count, device):
        factor = real_factor(count, device)
        factors.append((float(count), float(factor)))
        return factor
    heads.avg_factor_from_count = recorded_factor
    images, targets = global_batch()
    if rank == 1:
        targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in targets]
    done = {}
    for kind in BOX_LOSSES:
        # box terms over the positives: rank 1 counts 0 of them, so its avg_factor is rank 0's alone
        box = {"type": kind, "avg_factor": "positives"}
        cfg = validate_config({**raw, "model": {**raw["model"], "rpn": {**raw["model"]["rpn"], "box_loss": box},
                                                "roi": {**raw["model"]["roi"], "box_loss": box}}}, "test")
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(build_model(cfg.model).train())
        factors.clear()
        losses = one_step(model, images[:2], targets[:2], build_loss_weights(cfg.model).final())
        grads = [p.grad for p in model.module.parameters() if p.grad is not None]
        wiou = [float(m.iou_loss_mean) for m in (model.module.rpn.box_wiou, model.module.roi_heads.box_wiou) if m]
        done[kind] = {"losses": losses, "factors": list(factors), "wiou_means": wiou,
                      "grad_digest": torch.stack([torch.stack([g.sum(), g.norm()]) for g in grads])}
    torch.save(done, os.path.join(out_dir, f"empty{rank}.pt"))
    dist.destroy_process_group()


BOX_LOSSES = ("smooth_l1", "l1", "giou", "diou", "ciou", "wiou")


def test_a_rank_without_objects_does_not_hang_any_box_loss(tmp_path):
    """...and what the two processes computed together: every avg_factor is the mean of both
    ranks' counts (the same on both, though rank 1 has no positives), DDP leaves the same
    gradient on both, and Wise-IoU's running mean is shared."""
    raw = tiny_dict(tmp_path)
    mp.spawn(_empty_rank_worker, args=(2, free_port(), raw, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"empty{rank}.pt", weights_only=True) for rank in range(2)]
    for kind in BOX_LOSSES:
        first, second = ranks[0][kind], ranks[1][kind]
        assert all(math.isfinite(v) for r in (first, second) for v in r["losses"].values()), kind
        assert len(first["factors"]) == len(second["factors"]) >= 4, kind  # rpn cls/box, roi cls/box
        for (count0, factor0), (count1, factor1) in zip(first["factors"], second["factors"]):
            assert factor0 == factor1 == pytest.approx(max(1.0, (count0 + count1) / 2)), (kind, count0, count1)
        assert any(c0 > 0 and c1 == 0 for (c0, _), (c1, _) in zip(first["factors"], second["factors"])), kind
        assert second["losses"]["loss_rpn_box"] == second["losses"]["loss_roi_box"] == 0.0  # nothing to regress
        assert first["losses"]["loss_rpn_box"] > 0 and first["losses"]["loss_roi_box"] > 0
        torch.testing.assert_close(first["grad_digest"], second["grad_digest"], rtol=1e-5, atol=1e-7)
        assert len(first["wiou_means"]) == (2 if kind == "wiou" else 0)
        assert first["wiou_means"] == second["wiou_means"]
        assert all(m != 1.0 for m in first["wiou_means"])  # updated from rank 0's boxes on both ranks
