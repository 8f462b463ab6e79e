"""Image + box (+ mask) transforms. Each takes (PIL image or tensor, target, rng) and returns both.

Boxes are xyxy in pixels of the current image; masks (when the target has them) uint8 [N, H, W]
at the image's size, resized with nearest neighbour and flipped with it (the dataset rasterizes
them at the resized size already, see `output_size`: then Resize leaves them). The rng is a numpy Generator seeded from
(seed, epoch, index), so augmentation is reproducible and survives a resume.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.models.detection.transform import resize_boxes


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """Scale that makes the short side `min_size` unless the long side would pass `max_size`
    (the torchvision / detectron2 rule)."""
    return min(min_size / min(height, width), max_size / max(height, width))


def resize_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [N, H, W] -> [N, height, width], nearest neighbour (an image without objects too)."""
    if not len(masks):
        return masks.new_zeros((0, height, width))
    return TF.resize(masks, [height, width], TF.InterpolationMode.NEAREST)


def hflip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """Mirror xyxy boxes [N, 4] in an image of the given width."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


class Resize:
    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def at(self, min_size: int) -> "Resize":
        return Resize(min_size, self.max_size)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image of this size after the resize."""
        scale = resize_scale(height, width, self.min_size, self.max_size)
        return max(1, round(height * scale)), max(1, round(width * scale))

    def __call__(self, image: Image.Image, target: dict, rng: np.random.Generator):
        width, height = image.size
        new_h, new_w = self.output_size(height, width)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), Image.BILINEAR)
            target = dict(target, boxes=resize_boxes(target["boxes"], (height, width), (new_h, new_w)))
            if "masks" in target and tuple(target["masks"].shape[-2:]) != (new_h, new_w):
                target["masks"] = resize_masks(target["masks"], new_h, new_w)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, prob: float):
        self.prob = prob

    def __call__(self, image: Image.Image, target: dict, rng: np.random.Generator):
        if self.prob > 0 and rng.random() < self.prob:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            target = dict(target, boxes=hflip_boxes(target["boxes"], image.size[0]))
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image, target


class ToTensor:
    def __call__(self, image: Image.Image, target: dict, rng: np.random.Generator):
        return TF.pil_to_tensor(image).float().div_(255.0), target


class Compose:
    def __init__(self, transforms: list):
        self.transforms = transforms

    def __call__(self, image, target, rng, min_size: int | None = None):
        """`min_size`: this batch's short side (multi-scale training) instead of Resize's own."""
        for transform in self.transforms:
            if min_size is not None and isinstance(transform, Resize):
                transform = transform.at(min_size)
            image, target = transform(image, target, rng)
        return image, target


def output_size(transforms, height: int, width: int, min_size: int | None = None) -> tuple[int, int]:
    """(height, width) that `transforms` give an image of this size (`min_size`: as in Compose):
    a Compose's Resize steps change it, any other transform keeps it."""
    for step in transforms.transforms if isinstance(transforms, Compose) else [transforms]:
        if isinstance(step, Resize):
            height, width = (step if min_size is None else step.at(min_size)).output_size(height, width)
    return height, width


def build_transforms(min_size: int, max_size: int, hflip_prob: float, train: bool) -> Compose:
    steps = [Resize(min_size, max_size)]
    if train and hflip_prob > 0:
        steps.append(RandomHorizontalFlip(hflip_prob))
    steps.append(ToTensor())
    return Compose(steps)
