"""What the classifier says on the probe's GT boxes: low_confidence, class_confusion.

Each check takes plain numbers and returns an Alarm or None; its thresholds are a `monitor.*` group
(config_monitor.py), their measured reasons in docs/monitor.md.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from rcnn_trainer.config_monitor import (LowConfidenceLimits)
from rcnn_trainer.monitor.alarms import Alarm
from rcnn_trainer.monitor.probe import ProbeResult


def check_low_confidence(history: list[ProbeResult], *, sustain: int, roi_positives: list[float] | None = None,
                         flips: bool = False, advice: CapacityAdvice | None = None,
                         limits: LowConfidenceLimits = LowConfidenceLimits(),
                         run_judgments: float | None = None) -> Alarm | None:
    """Probe detections at the threshold nearest 0.5 below `min_ratio` x GT per image for
    `sustain` checks in a row, while the classifier makes no progress on the GT boxes over
    those checks (a model still learning is left alone), told apart by what it says there:
    - foreground probability (1 - p(background)) below `fg_mass_split` and not rising by
      `min_progress`: background wins (alarm `low_confidence`: positive weights and sampling).
      Not while the RoI head's positives per image (`roi_positives`, one per judgment since
      the start) still grow by `min_growth` x from one `sustain` window to the next: the RPN
      is still learning to propose the objects, so the balance the head learns from is still
      shifting: a healthy head's foreground can sit low while they grow and rise after, while
      starved sampling's positives stay flat;
    - foreground found, but the true class's share of it not rising by `min_progress`:
      `class_confusion` (capacity, lr and iterations, class balance; flip augmentation when
      `flips`, since mirrored digits and letters are other classes or none). Judged once the
      foreground has been found at every one of the `sustain` checks and, when `history` holds
      the run's judgments after warmup and `run_judgments` how many the run makes, at every one
      of the last `confusion_wait` x run_judgments: the classes of a slow healthy run separate
      a while after its foreground arrives, with the true class at chance meanwhile, exactly
      as with shuffled labels; only the shuffled ones stay there;
    - foreground being found (mean over the window >= `found_mass`, not falling) and the head giving every
      GT box the same class distribution (mean `spread` over the window below `flat_spread`)
      with the true class's share not rising: `class_confusion` at once, labels first. It has
      learned the class prior and nothing from the image, as labels that do not follow the
      images make it do; a healthy head's class distributions follow the box even while the
      true class is still at chance. The margin is the monitor's thinnest (docs/monitor.md)."""
    if len(history) < sustain:
        return None
    recent = history[-sustain:]
    if not short_of_detections(recent, limits.min_ratio):
        return None
    dets = describe_detections(recent)
    mass = [h.classes.fg_mass for h in recent]
    correct = [h.classes.correct for h in recent]
    if learned_only_the_prior(recent, limits):
        return class_confusion(recent, dets, flips, same_for_every_object=True, advice=advice)
    if any(math.isnan(m) for m in mass) or mass[-1] < limits.fg_mass_split:
        return background_wins(dets, mass, roi_positives, sustain, limits)
    if min(mass) < limits.fg_mass_split:
        # foreground only just found: the classes separate after it, so a window in which it is
        # still arriving says nothing about them
        return None
    if run_judgments and judgments_found(history, limits.fg_mass_split) < limits.confusion_wait * run_judgments:
        return None  # foreground arrived recently: the classes separate after it
    if correct[-1] > correct[0] + limits.min_progress:
        return None  # classes are separating: still learning
    return class_confusion(recent, dets, flips, same_for_every_object=False, advice=advice)


def judgments_found(history: list[ProbeResult], fg_mass_split: float) -> int:
    """How many of the latest judgments in a row found the foreground on the GT boxes."""
    found = 0
    for h in reversed(history):
        if not h.classes.fg_mass >= fg_mass_split:  # NaN counts as not found
            break
        found += 1
    return found


def short_of_detections(recent: list[ProbeResult], min_ratio: float) -> bool:
    """GT objects at every check, and probe detections at the threshold nearest 0.5 below
    `min_ratio` x GT per image at every one."""
    if min(h.counts.gt_per_image for h in recent) <= 0:
        return False
    return not any(h.counts.nearest(0.5)[1] >= min_ratio * h.counts.gt_per_image for h in recent)


def describe_detections(recent: list[ProbeResult]) -> str:
    """The `seen` text's first part: detections near 0.5 and at the lowest threshold, vs GT."""
    near_half = [h.counts.nearest(0.5) for h in recent]
    lowest = recent[-1].counts.thresholds[0]
    return (f"probe detections/image with score >= {near_half[-1][0]:g}: "
            f"{', '.join(f'{d:.2f}' for _, d in near_half)} "
            f"(at >= {lowest:g}: {', '.join(f'{h.counts.at_lowest:.2f}' for h in recent)}) vs "
            f"{recent[-1].counts.gt_per_image:.2f} GT objects per image")


def learned_only_the_prior(recent: list[ProbeResult], limits: LowConfidenceLimits) -> bool:
    """Foreground found and not fading, every GT box given the same class distribution, the true
    class's share not rising: the head learned the class prior and nothing from the image."""
    mass = [h.classes.fg_mass for h in recent]
    correct = [h.classes.correct for h in recent]
    # NaN, not an error, for judgments restored from a checkpoint written before `spread` existed
    spread = [h.classes.spread for h in recent]
    # foreground found and not fading: an untrained head also gives every box the same
    # (uniform) distribution, with foreground C/(C+1) falling as it learns background
    return (not any(math.isnan(v) for v in mass + spread) and statistics.fmean(mass) >= limits.found_mass
            and mass[-1] >= mass[0] and statistics.fmean(spread) < limits.flat_spread
            and not correct[-1] > correct[0] + limits.min_progress)


def background_wins(dets: str, mass: list[float], roi_positives: list[float] | None, sustain: int,
                    limits: LowConfidenceLimits) -> Alarm | None:
    """The `low_confidence` alarm, unless the foreground probability (`mass`, one per check) is
    rising or the RoI head's positives per image still grow (the RPN is still learning)."""
    if not any(math.isnan(m) for m in mass) and mass[-1] > mass[0] + limits.min_progress:
        return None  # foreground scores are rising: still learning
    if positives_growing(roi_positives or [], sustain, limits.min_growth):
        return None
    return Alarm(
        name="low_confidence",
        seen=f"{dets}; on the GT boxes themselves the head gives foreground probability "
             f"{', '.join(f'{m:.2f}' for m in mass)}",
        why="background wins: even a perfectly placed box is scored as background, because background RoIs "
            "and anchors outweigh the foreground ones in the classification losses (too few positives sampled, "
            "or positives weighted too little)",
        change=["model.roi.cls_pos_weight: raise to 2-5", "model.rpn.cls_pos_weight: raise to 2-5",
                "model.roi.positive_fraction: raise toward 0.25-0.5",
                "model.rpn.positive_fraction: raise toward 0.5"])


@dataclass(frozen=True)
class CapacityAdvice:
    """The resolved values class_confusion may suggest changing: a suggestion names the run's
    value and a different one, or is left out (a run with a 1024-wide head is not told to use 1024)."""
    representation_size: int
    fpn_channels: int
    min_size: int
    max_iters: int

    def changes(self) -> list[str]:
        out = []
        if self.representation_size < 1024:
            out.append(f"model.roi.representation_size: {self.representation_size} -> 1024 (torchvision's width)")
        if self.fpn_channels < 256:
            out.append(f"model.backbone.fpn_channels: {self.fpn_channels} -> {min(256, 2 * self.fpn_channels)}")
        out.append(f"solver.max_iters: {self.max_iters} -> {2 * self.max_iters} (or solver.lr higher if the loss "
                   f"falls slowly)")
        out.append(f"data.min_size: {self.min_size} -> {self.min_size * 3 // 2} if objects are small")
        return out


def class_confusion(recent: list[ProbeResult], dets: str, flips: bool, *, same_for_every_object: bool,
                    advice: CapacityAdvice | None = None) -> Alarm:
    """The `class_confusion` alarm. `same_for_every_object`: the head gives every GT box the
    same class distribution (spread ~0), i.e. it learned the class prior and nothing from the
    image; labels that carry no signal do exactly that, so checking them comes first."""
    mass = [h.classes.fg_mass for h in recent]
    correct = [h.classes.correct for h in recent]
    accuracy = [h.classes.accuracy for h in recent]
    spreads = [h.classes.spread for h in recent]
    seen = (f"{dets}; on the GT boxes the head gives foreground probability {', '.join(f'{m:.2f}' for m in mass)} "
            f"but only {', '.join(f'{100 * c:.0f}%' for c in correct)} of it to the true class (top-1 "
            f"{', '.join(f'{100 * a:.0f}%' for a in accuracy)}, margin to the second class "
            f"{recent[-1].classes.margin:.2f}")
    mirrored = ["data.hflip_prob: 0 if the classes are not left-right symmetric (digits, letters, arrows, "
                "left/right parts): flipped images teach mirrored shapes (real digits, 300 iterations: AP 0.10 "
                "with flips, 0.15 without)"] if flips else []
    look_at_labels = ("data.train.ann_file: look at a few training images with their labels to rule out wrong "
                      "category ids (rcnn-eval --visualize 8 data.val.ann_file=<the training file> "
                      "data.val.img_dir=<its images>)")
    capacity = advice.changes() if advice is not None else [
        "solver.max_iters: train longer (or solver.lr higher if the loss falls slowly)"]
    leave = "model.roi.cls_pos_weight: leave it; raising it does not separate classes"
    if same_for_every_object:
        return Alarm(
            name="class_confusion",
            seen=f"{seen}; every box gets the same class distribution: spread between boxes "
                 f"{', '.join(f'{s:.3f}' for s in spreads)})",
            why="foreground is found but the head gives every object the same class distribution: it has learned how "
                "often each class occurs and nothing about which class an object is. Labels that do not follow the "
                "images (a wrong or shuffled category mapping, categories merged from several files) do exactly "
                "this; a head without the capacity to see the difference comes second",
            change=[look_at_labels, *mirrored, *capacity,
                    "data.repeat_factor_threshold: 0.3 or higher if one class holds most training objects (the "
                    "prior is then that class for every box)", leave])
    return Alarm(
        name="class_confusion",
        seen=f"{seen})",
        why="foreground is found but the classes are confused: the foreground mass is spread over several classes, "
            "so no single class reaches a confident score. The box head lacks capacity or resolution for these "
            "classes, or needs more steps or a higher lr; rare classes stay confused longest. If the true class stays "
            "at chance for long, check the labels themselves: a shuffled category mapping looks exactly like this",
        change=[*mirrored, *capacity, look_at_labels, leave])


def positives_growing(positives: list[float], window: int, min_growth: float) -> bool:
    """The mean of the last `window` values at least `min_growth` x the mean of the `window`
    before them (False with fewer than 2 x window values, or none before)."""
    values = [v for v in positives if math.isfinite(v)]
    if len(values) < 2 * window:
        return False
    before = statistics.fmean(values[-2 * window:-window])
    return before > 0 and statistics.fmean(values[-window:]) >= min_growth * before


