"""`solver.ema`: an exponential moving average of the weights, kept beside the raw ones.

After every applied optimizer step, each floating-point tensor of the state dict (parameters
and BatchNorm running statistics, as timm's ModelEmaV2 and YOLOv5 do) moves toward the
model's: `ema = d * ema + (1 - d) * weights`, with `d = decay * (1 - exp(-updates / warmup))`,
so the average follows the fast-changing early weights closely and slows to `decay` later.
Integer buffers (BatchNorm's batch counter) are copied. The average is saved in every
checkpoint (`ema`), restored exactly by --resume, evaluated during and after training, and used
by rcnn-eval and rcnn-predict when the config has it on.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn

from rcnn_trainer.dist_state import is_distributed


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float, warmup: int):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.float_keys = [k for k, v in self.weights.items() if v.is_floating_point()]
        self.other_keys = [k for k, v in self.weights.items() if not v.is_floating_point()]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return self.decay * (1.0 - math.exp(-self.updates / self.warmup))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        state = model.state_dict()
        step = 1.0 - self.current_decay()
        torch._foreach_lerp_([self.weights[k] for k in self.float_keys],
                             [state[k].detach() for k in self.float_keys], step)
        for k in self.other_keys:
            self.weights[k].copy_(state[k])

    def sync_from_main(self) -> None:
        """Rank 0's average on every rank. Parameters agree across ranks (the gradients are
        all-reduced); BatchNorm statistics are each rank's own, so the average's differ."""
        if is_distributed():
            for tensor in self.weights.values():
                dist.broadcast(tensor, src=0)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module):
        """The model holds the averaged weights inside the block, its own again after it."""
        raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.weights)
        try:
            yield model
        finally:
            model.load_state_dict(raw)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for k, v in state["weights"].items():
            self.weights[k].copy_(v)
