"""Repeat-factor sampling (LVIS, Gupta et al. 2019; detectron2's RepeatFactorTrainingSampler).

A class that appears in a fraction f_c of the training images gets r_c = max(1, sqrt(t / f_c))
for a threshold t; an image is repeated r_i = max over its classes of r_c times per epoch, the
fractional part by a coin flip that is a function of (seed, epoch): rare classes are seen more
often without duplicating whole epochs, and a resumed run samples exactly the same.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def repeat_factors(image_labels: Sequence[np.ndarray], threshold: float) -> list[float]:
    """One factor >= 1 per image, from the labels of each image's objects."""
    images_with = {}
    for labels in image_labels:
        for label in set(labels.tolist()):
            images_with[label] = images_with.get(label, 0) + 1
    total = max(len(image_labels), 1)
    per_class = {label: max(1.0, math.sqrt(threshold / (count / total))) for label, count in images_with.items()}
    return [max((per_class[label] for label in set(labels.tolist())), default=1.0) for labels in image_labels]


def drawn_object_counts(image_labels: Sequence[np.ndarray], num_classes: int,
                        threshold: float | None) -> list[float]:
    """Objects of each class 1..num_classes per epoch as the sampler draws them: each image's
    objects times its repeat factor (1 without repeat-factor sampling)."""
    factors = repeat_factors(image_labels, threshold) if threshold is not None else [1.0] * len(image_labels)
    counts = np.zeros(num_classes + 1)
    for labels, factor in zip(image_labels, factors):
        np.add.at(counts, labels.astype(np.int64), factor)
    return counts[1:].tolist()


def epoch_copies(factors: Sequence[float], generator: torch.Generator) -> list[int]:
    """How many times each image is drawn this epoch: floor(r) plus one more with
    probability frac(r)."""
    rolls = torch.rand(len(factors), generator=generator).tolist()
    return [int(r) + (roll < r - int(r)) for r, roll in zip(factors, rolls)]
