"""Training augmentations beyond the horizontal flip and the min_size list (`data.augment`):
vertical flip, rotations by 90/180/270 degrees, photometric jitter and scale jitter.

Geometric steps hand the image, the boxes (tv_tensors.BoundingBoxes) and the masks
(tv_tensors.Mask) to the same torchvision transforms.v2 kernel, so boxes and masks follow the
pixels exactly (a rotation by a multiple of 90 degrees moves whole pixels: no interpolation, no
box growth). Photometric steps touch the image only. Parameters are drawn from the item's numpy
Generator, seeded by (seed, epoch, index, copy) in CocoDetection, never from torch's global RNG:
the same item gets the same augmentation in any worker and after a resume. A step that is off
draws nothing, so a config without `data.augment` draws exactly what it drew before.

Each step is a callable (image, target, rng) -> (image, target) like those of transforms.py;
images are PIL until ToTensor. Boxes are xyxy pixels of the current image.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision import tv_tensors

from rcnn_trainer.data import transforms as T
from rcnn_trainer.data.transforms import Resize


def geometric(kernel, image: Image.Image, target: dict, **kwargs) -> tuple[Image.Image, dict]:
    """`kernel` (a transforms.v2 functional) applied to the image, its boxes and its masks alike."""
    width, height = image.size
    boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width))
    out = dict(target, boxes=kernel(boxes, **kwargs).as_subclass(torch.Tensor))
    turned = kernel(image, **kwargs)
    if "masks" in target:
        masks = target["masks"]
        out["masks"] = (kernel(tv_tensors.Mask(masks), **kwargs).as_subclass(torch.Tensor) if len(masks)
                        else masks.new_zeros((0, turned.size[1], turned.size[0])))  # no objects: the new size
    return turned, out


class RandomVerticalFlip:
    def __init__(self, prob: float):
        self.prob = prob

    def __call__(self, image: Image.Image, target: dict, rng: np.random.Generator):
        if rng.random() < self.prob:
            return geometric(F.vertical_flip, image, target)
        return image, target


class RandomRot90:
    """With probability `prob`, a counter-clockwise rotation by 90, 180 or 270 degrees (each
    equally likely); the canvas turns with the image (expand), so nothing is cut."""

    def __init__(self, prob: float):
        self.prob = prob

    def __call__(self, image: Image.Image, target: dict, rng: np.random.Generator):
        if rng.random() < self.prob:
            return geometric(F.rotate, image, target, angle=90.0 * int(rng.integers(1, 4)), expand=True)
        return image, target


class ColorJitter:
    """torchvision's ColorJitter with the item's rng: each factor drawn uniformly ([1 - b, 1 + b],
    hue [-h, h]) and the four adjustments applied in a random order. Targets are untouched."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0):
        self.steps = [(F.adjust_brightness, 1.0, brightness), (F.adjust_contrast, 1.0, contrast),
                      (F.adjust_saturation, 1.0, saturation), (F.adjust_hue, 0.0, hue)]

    def __call__(self, image: Image.Image, target: dict, rng: np.random.Generator):
        for i in rng.permutation(len(self.steps)).tolist():
            adjust, center, spread = self.steps[i]
            if spread > 0:
                factor = float(rng.uniform(max(center - spread, 0.0), center + spread))
                image = adjust(image, factor)
        return image, target


class ScaleJitter(Resize):
    """Resize with the scale of min_size/max_size times a factor drawn from [low, high] (the short
    side list's size under multi-scale training included, see `at`). `output_size` stays the
    unjittered size: masks rasterized there are resized with the image (nearest neighbour), and
    boxes scale with the image's actual size (torchvision's resize_boxes)."""

    def __init__(self, min_size: int, max_size: int, low: float, high: float):
        super().__init__(min_size, max_size)
        self.low, self.high = low, high

    def at(self, min_size: int) -> "ScaleJitter":
        return ScaleJitter(min_size, self.max_size, self.low, self.high)

    def __call__(self, image: Image.Image, target: dict, rng: np.random.Generator):
        factor = float(rng.uniform(self.low, self.high))
        return Resize(self.min_size * factor, self.max_size * factor)(image, target, rng)


def augment_steps(augment) -> list:
    """The steps after Resize and the horizontal flip for a `data.augment` section (None: none)."""
    if augment is None:
        return []
    steps: list = []
    if augment.vflip_prob > 0:
        steps.append(RandomVerticalFlip(augment.vflip_prob))
    if augment.rot90_prob > 0:
        steps.append(RandomRot90(augment.rot90_prob))
    jitter = augment.color_jitter
    if jitter is not None and (jitter.brightness or jitter.contrast or jitter.saturation or jitter.hue):
        steps.append(ColorJitter(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue))
    return steps


def build_transforms(min_size: int, max_size: int, hflip_prob: float, train: bool, augment=None) -> T.Compose:
    """transforms.build_transforms plus `augment` (a `data.augment` section) when training: Resize
    (ScaleJitter with scale_jitter), the horizontal flip, these steps, ToTensor."""
    if not train or augment is None or not augment.enabled:
        return T.build_transforms(min_size, max_size, hflip_prob, train)
    low_high = augment.scale_jitter
    steps = [Resize(min_size, max_size) if low_high is None else ScaleJitter(min_size, max_size, *low_high)]
    if hflip_prob > 0:
        steps.append(T.RandomHorizontalFlip(hflip_prob))
    return T.Compose(steps + augment_steps(augment) + [T.ToTensor()])
