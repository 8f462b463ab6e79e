"""The learning rate: vanishing_lr, lr_too_high_for_batch.

Each check takes plain numbers and returns an Alarm or None; its thresholds are a `monitor.*` group
(config_monitor.py), their measured reasons in docs/monitor.md.
"""

from __future__ import annotations

from rcnn_trainer.config_monitor import (LearningRateLimits,
                                         LrPerImageLimits)
from rcnn_trainer.monitor.alarms import Alarm


def check_learning_rate(lr: float, base_lr: float, loss: float, initial_loss: float, *, progress: float,
                        past_warmup: bool, lowest_term_ratio: float | None = None,
                        limits: LearningRateLimits = LearningRateLimits()) -> Alarm | None:
    """lr negligible (under `negligible_share` x the base, or below `negligible_lr`) while the
    model has not learned.
    A planned decay at the end of a schedule is not an alarm; it is one when the loss is still
    above `never_learned` x its value at the first step and no loss term has fallen below
    `learned_term` x its first judgment's mean (`lowest_term_ratio`: a heavily weighted term can
    hold the total up while the others learned), or when the lr is already negligible in the
    first half of the run (`progress` < 0.5) with the loss above `early_decay_loss` x it."""
    if not past_warmup or initial_loss <= 0:
        return None
    lim = limits
    negligible = lr < lim.negligible_share * base_lr or lr < lim.negligible_lr
    some_term_learned = lowest_term_ratio is not None and lowest_term_ratio < lim.learned_term
    stuck = loss > lim.never_learned * initial_loss and not some_term_learned
    too_early = progress < lim.early_progress and loss > lim.early_decay_loss * initial_loss
    if not (negligible and (stuck or too_early)):
        return None
    return Alarm(
        name="vanishing_lr",
        seen=f"lr {lr:.2e} (base {base_lr:.2e}) at {100 * progress:.0f}% of the run while the loss is {loss:.3f}, "
             f"{100 * loss / initial_loss:.0f}% of its first-step {initial_loss:.3f}",
        why="the weights barely move any more but the model has not learned: the schedule decayed too early "
            "or the base lr is far too small",
        change=["solver.lr: raise it (0.02 per 16 images for SGD, ~1e-3 for AdamW)",
                "solver.steps / solver.max_iters: decay later", "solver.schedule: cosine or multistep"])


def check_lr_per_image(lr: float, batch_size: int, optimizer: str,
                       limits: LrPerImageLimits = LrPerImageLimits()) -> Alarm | None:
    """SGD lr per image far above the reference 0.02 / 16."""
    reference = 0.02 / 16
    if optimizer != "sgd" or lr / batch_size <= limits.limit * reference:
        return None
    return Alarm(
        name="lr_too_high_for_batch",
        seen=f"solver.lr {lr:g} for {batch_size} images per step = {lr / batch_size / reference:.1f}x the "
             f"reference 0.02 per 16 images",
        why="Faster R-CNN with SGD usually diverges far above the linear-scaling reference",
        change=[f"solver.lr: about {reference * batch_size:.4g}", "solver.warmup_iters: longer",
                "solver.clip_grad_norm: 10"])


