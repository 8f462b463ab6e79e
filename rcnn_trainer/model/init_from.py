"""`model.init_from`: start a new run from a detector trained before, usually on other classes.

The source is an rcnn_trainer checkpoint (its EMA weights when it has them) or a torchvision FasterRCNN / MaskRCNN state dict
(the same key names as ours; a reference-script checkpoint's {"model": ...} too). Every tensor
whose name and shape match is copied; the others keep their initialization: the class-dependent
predictor layers when the class count differs, a mask head the source does not have. The file
is read as data only (rcnn_trainer/safe_load.py). detectron2's MODEL.WEIGHTS and MMDetection's
load_from do the same.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rcnn_trainer.errors import UserError
from rcnn_trainer.model.cascade import adapt_one_stage_state
from rcnn_trainer.safe_load import load_weights_only

MIN_MATCHED_SHARE = 0.5  # of the model's parameters (elements): below it the file is not a detector like ours


@dataclass
class InitReport:
    loaded: list[str]         # our tensors copied from the file
    reinitialized: list[str]  # ours the file has not (or has in another shape): their init kept
    unused: list[str]         # the file's tensors that went nowhere
    matched_share: float      # of our parameters' elements, loaded

    def lines(self) -> list[str]:
        def modules(names: list[str]) -> str:
            counts = Counter(".".join(n.split(".")[:2]) for n in names)
            return ", ".join(f"{m} ({c})" for m, c in sorted(counts.items())) or "none"

        return [f"loaded {len(self.loaded)} tensors ({100 * self.matched_share:.1f}% of the parameters): "
                f"{modules(self.loaded)}",
                f"re-initialized {len(self.reinitialized)}: {modules(self.reinitialized)}"
                + (f" ({', '.join(self.reinitialized[:6])}{', ...' if len(self.reinitialized) > 6 else ''})"
                   if self.reinitialized else ""),
                f"unused from the file {len(self.unused)}: {modules(self.unused)}"]


def source_state(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The file's tensors by name, and which they are: a checkpoint's EMA weights (solver.ema:
    what its evaluation used), its or a reference script's "model" entry, or the state dict
    itself; DDP's "module." prefix removed."""
    obj = load_weights_only(path, "model.init_from")
    state, what = (obj.get("model", obj), "weights") if isinstance(obj, dict) else (obj, "weights")
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict) and isinstance(obj["ema"].get("weights"), dict):
        state, what = obj["ema"]["weights"], "EMA weights (solver.ema)"
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.init_from '{path}' holds no state dict (a dict of tensors, or a checkpoint whose "
                        f"'model' entry is one).")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}, what


def initialize_from(model: nn.Module, path: Path, say: Callable[[str], None]) -> InitReport:
    state, what = source_state(path)
    say(f"[init_from] '{path}': its {what}")
    state, notes = adapt_one_stage_state(model, state)  # a one-stage file into Cascade R-CNN's first stage
    for note in notes:
        say(f"[init_from] {note}")
    ours = model.state_dict()
    matched = {k: v for k, v in state.items() if k in ours and ours[k].shape == v.shape}
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    share = sum(params[k].numel() for k in matched if k in params) / max(total, 1)
    if share < MIN_MATCHED_SHARE:
        shapes = [k for k in state if k in ours and ours[k].shape != state[k].shape][:3]
        raise UserError(
            f"model.init_from '{path}': only {100 * share:.0f}% of the model's parameters match the file by name and "
            f"shape ({len(matched)} of {len(ours)} tensors; file keys such as {list(state)[:3]}"
            + (f"; other shapes: {shapes}" if shapes else "") + "). It is not a detector with this backbone and "
            f"FPN: check model.backbone.name and fpn_channels against the run that wrote it.")
    model.load_state_dict(matched, strict=False)
    report = InitReport(loaded=sorted(matched), reinitialized=sorted(k for k in ours if k not in matched),
                        unused=sorted(k for k in state if k not in matched), matched_share=share)
    for line in report.lines():
        say(f"[init_from] {line}")
    return report
