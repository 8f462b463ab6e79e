"""What one optimizer step does after its backward pass: the skip / fp16-overflow / non-finite
decision, as a pure function of host numbers (so each branch has a unit test)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class StepOutcome(Enum):
    APPLY = "apply"                # finite losses and gradients: the optimizer steps
    AMP_OVERFLOW = "amp_overflow"  # fp16 gradients overflowed: the GradScaler skips the update and
    #                                lowers its scale; normal while it finds the scale, not an error
    NONFINITE = "nonfinite"        # a loss term or (without a scaler) the gradients are inf/NaN: skipped


@dataclass(frozen=True)
class StepDecision:
    outcome: StepOutcome
    bad_terms: tuple[str, ...] = ()  # the non-finite loss terms, or ("gradients",)

    @property
    def calls_optimizer(self) -> bool:
        """scaler.step runs for APPLY and AMP_OVERFLOW (it skips the update itself on an overflow)."""
        return self.outcome is not StepOutcome.NONFINITE


def decide_step(loss_values: dict[str, float], grad_norm: float, scaler_enabled: bool) -> StepDecision:
    """`loss_values`: each loss term averaged over ranks (every rank decides alike);
    `grad_norm`: the pre-clip total gradient norm (the same on every rank)."""
    bad = tuple(name for name, value in loss_values.items() if not math.isfinite(value))
    if bad:
        return StepDecision(StepOutcome.NONFINITE, bad)
    if math.isfinite(grad_norm):
        return StepDecision(StepOutcome.APPLY)
    if scaler_enabled:
        return StepDecision(StepOutcome.AMP_OVERFLOW)
    return StepDecision(StepOutcome.NONFINITE, ("gradients",))
