"""The threshold-count table: mean detections per image at each score threshold, next to the
ground-truth objects per image. The monitor's own measure; evaluation prints it too."""

from __future__ import annotations


def threshold_counts(predictions: list[tuple[int, dict]], thresholds: list[float],
                     gt_per_image: float) -> dict:
    """predictions: (image id, {"scores": [D], ...}) per image."""
    num_images = max(len(predictions), 1)
    counts = {f"dets@{t:g}": sum(int((det["scores"] >= t).sum()) for _, det in predictions) / num_images
              for t in thresholds}
    return {**counts, "gt_per_image": gt_per_image}


def format_threshold_table(counts: dict) -> str:
    keys = [k for k in counts if k.startswith("dets@")]
    header = "  score >=  " + "".join(f"{k[5:]:>7}" for k in keys) + "     GT"
    row = "  dets/img  " + "".join(f"{counts[k]:7.2f}" for k in keys) + f"{counts['gt_per_image']:7.2f}"
    return header + "\n" + row
