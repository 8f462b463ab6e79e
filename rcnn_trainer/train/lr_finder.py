"""LR range test (`rcnn-train --config C --lr-find`).

Runs a short exponential lr sweep from `min_lr` to `max_lr` on the training data, records
the exponentially smoothed loss at each lr, stops early when the loss diverges (non-finite,
or above 4x the best smoothed loss), then restores the model and optimizer. Writes only
lr_find.json (and lr_find.png when matplotlib is there) in the output dir: no checkpoint.

Suggestion rule: the lr where the smoothed loss is lowest, divided by 10 (one decade below
the point where the loss stops improving: the usual, conservative reading of the curve).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from rcnn_trainer.config import Config
from rcnn_trainer.data.loader import build_dataset, build_train_loader
from rcnn_trainer.runtime.device import pick_device, to_device
from rcnn_trainer.train.optim import build_optimizer
from rcnn_trainer.losses.weighting import weighted_total
from rcnn_trainer.data.settings import resolve_from_data
from rcnn_trainer.model.build import build_loss_weights, build_model
from rcnn_trainer.train.run_lock import RunLock
from rcnn_trainer.run_folder import claim_folder
from rcnn_trainer.atomic_io import atomic_save_image, atomic_write_text

SMOOTHING = 0.9
DIVERGE_FACTOR = 4.0


def lr_sweep(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, weights: dict, *,
             min_lr: float, max_lr: float, iters: int, device, progress: bool = True) -> list[dict]:
    """Exponential sweep; returns [{lr, loss, smoothed}] up to where it diverged. The model and
    optimizer are restored to their state before the sweep."""
    model_state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    points, avg, best = [], 0.0, math.inf
    model.train()
    try:
        for step in tqdm(range(iters), desc="lr-find", disable=not progress, leave=False):
            lr = min_lr * (max_lr / min_lr) ** (step / max(iters - 1, 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses, _ = model(*to_device(*next(batches), device))
            total, _ = weighted_total(losses, weights)
            value = float(total.detach())
            if not math.isfinite(value):
                break
            avg = SMOOTHING * avg + (1 - SMOOTHING) * value
            smoothed = avg / (1 - SMOOTHING ** (step + 1))
            points.append({"lr": lr, "loss": value, "smoothed": smoothed})
            if smoothed > DIVERGE_FACTOR * best:
                break
            best = min(best, smoothed)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        optimizer.zero_grad(set_to_none=True)
    return points


def suggest_lr(points: list[dict]) -> float | None:
    if len(points) < 3:
        return None
    best = min(points, key=lambda p: p["smoothed"])
    return best["lr"] / 10.0


def format_curve(points: list[dict], rows: int = 15) -> str:
    step = max(1, len(points) // rows)
    lines = ["        lr     loss  smoothed"]
    lines += [f"  {p['lr']:8.2e}  {p['loss']:7.3f}  {p['smoothed']:8.3f}" for p in points[::step]]
    return "\n".join(lines)


def run_lr_find(cfg: Config, *, min_lr: float = 1e-6, max_lr: float = 1.0, iters: int = 100,
                log: Callable[[str], None] = print, progress: bool = True) -> dict:
    out = Path(cfg.output_dir)
    claim_folder(out, "rcnn-train --lr-find", ("lr_find.json", "lr_find.png", ".lock"),
                 hint="choose a new or empty --output-dir, or the run folder of an earlier run")
    with RunLock(out):  # a run training into this folder is not disturbed
        return _lr_find(cfg, out, min_lr, max_lr, iters, log, progress)


def _lr_find(cfg: Config, out: Path, min_lr: float, max_lr: float, iters: int, log: Callable[[str], None],
             progress: bool) -> dict:
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.train.device)
    train_set = build_dataset(cfg, "train")
    cfg = resolve_from_data(cfg, train_set, log)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.solver)
    batches = iter(build_train_loader(cfg, train_set))
    weights = build_loss_weights(cfg.model).final()
    points = lr_sweep(model, optimizer, batches, weights, min_lr=min_lr, max_lr=max_lr, iters=iters, device=device,
                      progress=progress)
    suggestion = suggest_lr(points)
    stopped = "" if len(points) == iters else f" (stopped at lr {points[-1]['lr']:.2e} when the loss diverged)" if points else ""
    log(f"[lr-find] {len(points)} steps from {min_lr:.1e} to {max_lr:.1e}{stopped}\n{format_curve(points)}")
    if suggestion is None:
        log("[lr-find] too few finite steps to suggest an lr: lower --lr-find-range MAX or check the data.")
    else:
        log(f"[lr-find] suggested solver.lr={suggestion:.2e} (rule: the lr of the lowest smoothed loss, "
            f"{suggestion * 10:.2e}, divided by 10)")
    result = {"suggested_lr": suggestion, "rule": "lr at the lowest smoothed loss / 10", "points": points}
    atomic_write_text(out / "lr_find.json", json.dumps(result, indent=1))
    picture = _plot(points, suggestion, out / "lr_find.png")
    log(f"[lr-find] wrote {out / 'lr_find.json'}" + (f" and {picture}" if picture else
                                                      " (install matplotlib for lr_find.png)"))
    return result


def _plot(points: list[dict], suggestion: float | None, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["lr"] for p in points], [p["loss"] for p in points], alpha=0.3, label="loss")
    ax.plot([p["lr"] for p in points], [p["smoothed"] for p in points], label="smoothed")
    if suggestion:
        ax.axvline(suggestion, color="red", ls="--", label=f"suggested {suggestion:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    atomic_save_image(fig, path)
    plt.close(fig)
    return path
