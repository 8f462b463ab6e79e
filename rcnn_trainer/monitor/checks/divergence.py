"""divergence: the loss or the gradients far above anything the start of training showed.

Absolute evidence, judged from the first judgment on (warmup included: a too-high lr diverges
while it ramps up): the loss against the first step's loss and its expected value at
initialization, the loss against the best it reached, the grad norm against the first steps'
(taken before the lr can have acted). The spike check in `check_gradients` is relative to a
running median, so norms that are huge from the start never counted as a spike.
"""

from __future__ import annotations

import math
import statistics

from rcnn_trainer.config_monitor import DivergenceLimits
from rcnn_trainer.monitor.alarms import Alarm

SGD_LR_PER_16_IMAGES = 0.02  # the linear scaling rule's reference (Goyal et al. 2017)


def check_divergence(losses: list[float], norms: list[float], *, initial_loss: float | None,
                     expected_initial: float | None, lowest_mean: float | None, reference_norm: float | None,
                     lr: float, base_lr: float, optimizer: str, batch_size: int, warmup_iters: int, clip_grad_norm: float | None,
                     limits: DivergenceLimits = DivergenceLimits()) -> Alarm | None:
    """`losses`, `norms`: this judgment's per-step values; `lowest_mean`: the lowest judgment mean
    before this one. Returns the alarm with the lr advice first, or None."""
    finite_losses = [v for v in losses if math.isfinite(v)]
    finite_norms = [v for v in norms if math.isfinite(v)]
    seen = []
    start = max(v for v in (initial_loss, expected_initial, 0.0) if v is not None and math.isfinite(v))
    mean = statistics.fmean(finite_losses) if finite_losses else math.nan
    if start > 0 and mean > limits.loss_factor * start:
        seen.append(f"mean loss {mean:.4g} = {mean / start:.0f}x the start of training ({start:.3g})")
    elif (lowest_mean and initial_loss and mean > limits.explode * lowest_mean and mean > initial_loss):
        seen.append(f"mean loss {mean:.4g}, {mean / lowest_mean:.1f}x the lowest it reached ({lowest_mean:.3g}) "
                    f"and above the first step's {initial_loss:.3g}")
    if reference_norm and finite_norms:
        median = statistics.median(finite_norms)
        if median > limits.grad_factor * reference_norm:
            seen.append(f"median grad norm {median:.4g} = {median / reference_norm:.0f}x the first steps' "
                        f"({reference_norm:.3g})")
    if not seen:
        return None
    return Alarm(
        name="divergence",
        seen="; ".join(seen) + f" (lr {lr:.2e} of solver.lr {base_lr:.2e}, {optimizer})",
        why="the updates overshoot: the lr is too high for this model and batch, and what the model learned is "
            "being destroyed; collapse to background and confused classes follow from it, not from the class balance",
        change=lr_advice(base_lr, optimizer, batch_size, warmup_iters, clip_grad_norm))


def lr_advice(lr: float, optimizer: str, batch_size: int, warmup_iters: int, clip_grad_norm: float | None) -> list[str]:
    if optimizer == "sgd":
        rule = SGD_LR_PER_16_IMAGES * batch_size / 16
        first = f"solver.lr: {min(rule, lr / 10):.2g} (the linear scaling rule gives {rule:.2g} for {batch_size} images/step"
    else:
        first = f"solver.lr: {lr / 10:.2g} (10x lower; AdamW detectors train at 1e-4 to 1e-3"
    return [first + "; `rcnn-train --config C --lr-find` measures it on your data)",
            f"solver.warmup_iters: {max(2 * warmup_iters, 200)} (longer warmup; now {warmup_iters})",
            "solver.clip_grad_norm: 10 (now off)" if clip_grad_norm is None
            else f"solver.clip_grad_norm: lower it (now {clip_grad_norm:g})"]
