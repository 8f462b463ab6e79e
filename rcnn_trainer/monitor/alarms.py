"""Alarms: what was seen (numbers), why it matters, what to change (config keys).

Each check is one small function that takes numbers and returns an Alarm or None.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Alarm:
    name: str
    seen: str
    why: str
    change: list[str] = field(default_factory=list)  # "config.key: suggestion"

    def format(self) -> str:
        lines = [f"ALARM [{self.name}]", f"  seen:   {self.seen}", f"  why:    {self.why}"]
        lines += [f"  change: {item}" for item in self.change]
        return "\n".join(lines)

    def to_record(self) -> dict:
        return asdict(self)


def check_collapse(history: list[float], gt_per_image: float, *, min_ratio: float, patience: int) -> Alarm | None:
    """Detections per image at the lowest score threshold, one value per probe check.

    Fires when the last `patience` values are all below `min_ratio` * GT per image, or when
    the latest value fell more than 90% from the peak, while ground truth is not zero.
    """
    if gt_per_image <= 0 or not history:
        return None
    floor = min_ratio * gt_per_image
    recent = history[-patience:]
    peak = max(history)
    below = len(recent) == patience and all(v < floor for v in recent)
    dropped = peak > 0 and history[-1] < 0.1 * peak and peak >= floor
    if not (below or dropped):
        return None
    trend = " -> ".join(f"{v:.2f}" for v in history[-8:])
    reason = (f"below {min_ratio:g} x GT for {patience} checks in a row" if below
              else f"down more than 90% from its peak {peak:.2f}")
    return Alarm(
        name="collapse",
        seen=f"detections/image at the lowest threshold: {trend} ({reason}); GT objects/image {gt_per_image:.2f}",
        why="the detector is predicting background everywhere: background RoIs/anchors swamp the "
            "foreground ones, or the lr is too high (diverged) or too low (never learned), or no anchor fits the objects",
        change=["model.roi.cls_pos_weight: raise to 2-5 (foreground RoIs weigh more than background)",
                "model.rpn.cls_pos_weight: raise to 2-5 (foreground anchors weigh more)",
                "model.roi.positive_fraction: raise toward 0.5 (more positives sampled)",
                "model.roi.cls_loss.type: focal (down-weights easy background)",
                "solver.lr: lower it 2-10x if losses jumped, raise it if they never fell",
                "model.anchors.sizes: match the object sizes (see the preflight's anchor coverage)"])
