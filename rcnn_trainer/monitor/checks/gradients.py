"""Gradients and AMP: gradients, amp_loss_scale.

Each check takes plain numbers and returns an Alarm or None; its thresholds are a `monitor.*` group
(config_monitor.py), their measured reasons in docs/monitor.md.
"""

from __future__ import annotations

import math
import statistics

from rcnn_trainer.config_monitor import (GradientLimits, LossScaleLimits)
from rcnn_trainer.monitor.alarms import Alarm


def check_gradients(window_norms: list[float], past_norms: list[float], clipped_share: float,
                    nonfinite_steps: int, limits: GradientLimits = GradientLimits()) -> Alarm | None:
    """Gradient-norm spikes over the running median, frequent clipping, non-finite steps."""
    seen = []
    finite = [n for n in past_norms if math.isfinite(n)]
    window_finite = [n for n in window_norms if math.isfinite(n)]
    spike = limits.spike
    if len(finite) >= limits.min_history and window_finite:
        median = statistics.median(finite)
        peak = max(window_finite)
        if median > 0 and peak > spike * median:
            seen.append(f"grad norm spike {peak:.3g} = {peak / median:.0f}x the running median {median:.3g}")
    if clipped_share > limits.max_clipped:
        seen.append(f"{100 * clipped_share:.0f}% of steps clipped")
    if nonfinite_steps:
        seen.append(f"{nonfinite_steps} non-finite steps skipped this period")
    if not seen:
        return None
    clip = "solver.clip_grad_norm: set it (e.g. 10), or raise it if nearly every step clips"
    # clipping alone (no spike, nothing non-finite): the clip sets the step size, so it is the knob
    only_clipping = len(seen) == 1 and clipped_share > limits.max_clipped
    return Alarm(
        name="gradients",
        seen="; ".join(seen),
        why="unstable gradients precede divergence; constant clipping means the effective lr is set by the clip",
        change=([clip, "solver.lr: lower it"] if only_clipping else ["solver.lr: lower it", clip])
        + ["solver.warmup_iters: longer"])


def check_loss_scale(scales: list[float], limits: LossScaleLimits = LossScaleLimits()) -> Alarm | None:
    """AMP loss scale lower at each of the last `limits.falls` periods."""
    falls = limits.falls
    if len(scales) <= falls or not all(b < a for a, b in zip(scales[-falls - 1:], scales[-falls:])):
        return None
    return Alarm(
        name="amp_loss_scale",
        seen="AMP loss scale " + " -> ".join(f"{s:g}" for s in scales[-falls - 1:]),
        why="the scaler keeps finding inf/NaN gradients in fp16: values overflow",
        change=["solver.amp: false to confirm", "solver.clip_grad_norm: set it", "solver.lr: lower it"])


