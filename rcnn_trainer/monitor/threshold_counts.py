"""The threshold-count table: mean detections per image at each score threshold, next to the
ground-truth objects per image. The monitor's own measure; evaluation prints it too."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ThresholdCounts:
    thresholds: tuple[float, ...]      # ascending
    dets_per_image: tuple[float, ...]  # one per threshold
    gt_per_image: float

    @property
    def at_lowest(self) -> float:
        return self.dets_per_image[0]

    def nearest(self, score: float) -> tuple[float, float]:
        """(threshold, detections per image) at the threshold nearest `score`."""
        i = min(range(len(self.thresholds)), key=lambda j: abs(self.thresholds[j] - score))
        return self.thresholds[i], self.dets_per_image[i]

    def as_record(self) -> dict:
        """The columns of metrics.jsonl and metrics.json: dets@<threshold>, gt_per_image."""
        return {**{f"dets@{t:g}": d for t, d in zip(self.thresholds, self.dets_per_image)},
                "gt_per_image": self.gt_per_image}

    def as_state(self) -> dict:
        return {"thresholds": list(self.thresholds), "dets_per_image": list(self.dets_per_image),
                "gt_per_image": self.gt_per_image}

    @classmethod
    def from_state(cls, state: dict) -> "ThresholdCounts":
        return cls(tuple(state["thresholds"]), tuple(state["dets_per_image"]), state["gt_per_image"])


def threshold_counts(predictions: list[tuple[int, dict]], thresholds: list[float],
                     gt_per_image: float) -> ThresholdCounts:
    """predictions: (image id, {"scores": [D], ...}) per image."""
    num_images = max(len(predictions), 1)
    ordered = tuple(sorted(thresholds))
    dets = tuple(sum(int((det["scores"] >= t).sum()) for _, det in predictions) / num_images for t in ordered)
    return ThresholdCounts(ordered, dets, gt_per_image)


def format_threshold_table(counts: ThresholdCounts) -> str:
    header = "  score >=  " + "".join(f"{t:>7g}" for t in counts.thresholds) + "     GT"
    row = "  dets/img  " + "".join(f"{d:7.2f}" for d in counts.dets_per_image) + f"{counts.gt_per_image:7.2f}"
    return header + "\n" + row
