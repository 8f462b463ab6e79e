"""Evaluations during training: overfitting.

Each check takes plain numbers and returns an Alarm or None; its thresholds are a `monitor.*` group
(config_monitor.py), their measured reasons in docs/monitor.md.
"""

from __future__ import annotations

import math

from rcnn_trainer.config_monitor import (OverfittingLimits)
from rcnn_trainer.monitor.alarms import Alarm


def check_overfitting(evals: list[dict], limits: OverfittingLimits = OverfittingLimits()) -> Alarm | None:
    """`evals`: one {"iter", "val_loss", "train_loss", "AP"} per evaluation of the run. Fires when
    the val loss rose at each of the last `sustain` evaluations, to `min_rise` above its lowest,
    while the training loss fell and val AP rose by no more than `ap_drop` over them; or when val
    AP stayed `ap_drop` below its best for the last `sustain` evaluations. Both need evaluations
    during training (train.eval_period)."""
    n = limits.sustain
    if len(evals) < n + 1:
        return None
    recent = evals[-(n + 1):]
    val, train = [e["val_loss"] for e in recent], [e["train_loss"] for e in recent]
    lowest = min(e["val_loss"] for e in evals)
    finite = all(math.isfinite(v) for v in val + train)
    # early in training the val loss rises with the training loss (more proposals become
    # positives, and the box terms count only those) while AP climbs: not overfitting
    ap_rose = recent[-1]["AP"] - recent[0]["AP"] > limits.ap_drop
    loss_rising = (finite and all(b > a for a, b in zip(val, val[1:])) and val[-1] >= (1 + limits.min_rise) * lowest
                   and train[-1] < train[0] and not ap_rose)
    best = max(evals, key=lambda e: e["AP"])
    ap_falling = best["AP"] > 0 and all(e["AP"] <= best["AP"] - limits.ap_drop for e in evals[-n:])
    if not (loss_rising or ap_falling):
        return None
    at = ", ".join(str(e["iter"]) for e in recent)
    seen = []
    if loss_rising:
        seen.append(f"val loss {' -> '.join(f'{v:.3f}' for v in val)} at iterations {at} (lowest {lowest:.3f}) while "
                    f"the training loss fell {train[0]:.3f} -> {train[-1]:.3f}")
    if ap_falling:
        aps = ", ".join(f"{e['AP']:.3f}" for e in evals[-n:])
        seen.append(f"val AP {aps} at the last {n} evaluations, below its best {best['AP']:.3f} at iteration "
                    f"{best['iter']}")
    return Alarm(
        name="overfitting",
        seen="; ".join(seen),
        why="the model fits the training images better while doing worse on images it does not train on: it "
            "memorizes the training set (too little data or augmentation for this many iterations)",
        change=["model_best.pth: the checkpoint of the best val AP so far (kept by every evaluation)",
                "solver.max_iters: stop about where val AP peaked",
                "data.augment.* (vflip_prob, rot90_prob, color_jitter, scale_jitter; docs/augment.md), data.hflip_prob "
                "(when the classes are mirror-safe) and data.min_size as a list (multi-scale): more augmentation",
                "model.backbone.weights / model.init_from: start from pretrained weights",
                "solver.weight_decay: raise it (e.g. x10)",
                "data.train: more (or more varied) training images"])


