"""Improving, not yet there: a symptom alarm waits while the metric it judges climbs at a rate
that reaches health before the run ends.

The rate is the least-squares slope per judgment over the last `monitor.trend.window`
judgments; continued over the judgments left in the run it must reach the healthy level, and
the metric must improve at every one of those judgments (by more than `min_step`): a stuck
metric's noise goes both ways. A metric on that course will be healthy by the end at the rate
it shows now; one that would not get there is the pathology whatever its sign.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OnCourse:
    """A held-back symptom: what it judges, where it is, where it is headed."""
    alarm: str
    metric: str
    first: float
    now: float
    projected: float
    target: float

    def describe(self) -> str:
        return (f"{self.alarm}: {self.metric} {self.first:.2f} -> {self.now:.2f}, on course for {self.projected:.2f} "
                f"by the end (healthy: {self.target:.2f})")


def slope(values: list[float]) -> float:
    """Least-squares slope per step."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    den = sum((i - mean_x) ** 2 for i in range(n))
    return sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / den if den else 0.0


def on_course(series: list[float], target: float, remaining: float, *, rising: bool = True,
              min_step: float = 0.0) -> float | None:
    """The projected value at the end of the run if `series` improves at every step and its trend
    reaches `target` within `remaining` judgments; else None."""
    if len(series) < 2 or remaining <= 0 or any(math.isnan(v) for v in series):
        return None
    sign = 1.0 if rising else -1.0
    if min(sign * (b - a) for a, b in zip(series, series[1:])) <= min_step:
        return None
    projected = series[-1] + slope(series) * remaining
    return projected if sign * (projected - target) >= 0 else None
