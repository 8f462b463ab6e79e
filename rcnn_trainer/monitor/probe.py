"""The probe: inference on a fixed set of training images at each monitor judgment, giving the
threshold-count table and what the classifier says about the ground-truth boxes themselves."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from rcnn_trainer.monitor.threshold_counts import ThresholdCounts, threshold_counts


@dataclass(frozen=True)
class ClassDiagnosis:
    """What the box classifier gives the GT boxes of the probe images (see class_diagnosis)."""
    fg_mass: float
    correct: float
    accuracy: float
    margin: float
    spread: float

    def as_record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ProbeResult:
    counts: ThresholdCounts
    classes: ClassDiagnosis

    def as_state(self) -> dict:
        """Plain values for the monitor's checkpointed history."""
        return {"counts": self.counts.as_state(), "classes": self.classes.as_record()}

    @classmethod
    def from_state(cls, state: dict) -> "ProbeResult":
        classes = {name: state["classes"].get(name, math.nan) for name in ClassDiagnosis.__dataclass_fields__}
        return cls(ThresholdCounts.from_state(state["counts"]), ClassDiagnosis(**classes))


def class_diagnosis(probabilities: torch.Tensor, labels: torch.Tensor) -> ClassDiagnosis:
    """probabilities [B, C+1] (column 0 background) on GT boxes with labels [B] in 1..C:
    fg_mass      mean 1 - p(background): does the head see an object where there is one?
    correct      mean p(true class) / fg_mass: of the foreground mass, how much is on the right class
    accuracy     share of boxes whose top foreground class is the true class
    margin       mean gap between the two highest foreground probabilities, over fg_mass
    spread       mean total-variation distance between each box's class distribution (its
                 foreground probabilities over fg_mass) and their mean over all boxes: ~0 when
                 the head gives every object the same class distribution (it has learned the
                 class prior and nothing from the image, as with labels that carry no signal)
    (NaN without boxes; with one foreground class `correct` and `accuracy` are 1, `spread` 0)."""
    if not len(labels):
        return ClassDiagnosis(*[float("nan")] * 5)
    fg = probabilities[:, 1:]
    mass = fg.sum(dim=1).clamp(min=1e-12)
    true = fg.gather(1, (labels - 1).long()[:, None]).squeeze(1)
    top2 = fg.topk(min(2, fg.shape[1]), dim=1).values
    margin = top2[:, 0] - top2[:, 1] if fg.shape[1] > 1 else top2[:, 0]
    shares = fg / mass[:, None]
    spread = 0.5 * (shares - shares.mean(dim=0)).abs().sum(dim=1)
    return ClassDiagnosis(fg_mass=float(mass.mean()), correct=float((true / mass).mean()),
                          accuracy=float((fg.argmax(dim=1) == labels - 1).float().mean()),
                          margin=float((margin / mass).mean()), spread=float(spread.mean()))


@torch.no_grad()
def probe(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict],
          thresholds: list[float]) -> ProbeResult:
    """Inference on the probe images (eval mode): detections per image at each score threshold
    next to GT per image, and the class diagnosis on the GT boxes (the class distribution the
    loss trains: with logit adjustment the test-time scores spread the mass over the rare
    classes on purpose, which is not confusion)."""
    was_training = model.training
    model.eval()
    try:
        detections = model(images, masks=False)
        boxes = [t["boxes"].to(images[0].device) for t in targets]
        probabilities = model.classify_boxes(images, boxes) if sum(len(b) for b in boxes) else None
    finally:
        model.train(was_training)
    labels = torch.cat([t["labels"] for t in targets]).to(images[0].device)
    counts = threshold_counts([(None, d) for d in detections], thresholds, len(labels) / len(images))
    diagnosis = class_diagnosis(probabilities, labels) if probabilities is not None else class_diagnosis(
        torch.zeros(0, 1), labels)
    return ProbeResult(counts, diagnosis)
