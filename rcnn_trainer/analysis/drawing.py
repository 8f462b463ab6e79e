"""Drawing boxes on images for people, with torchvision's draw_bounding_boxes: small images are
upscaled first, and labels get a filled background and a TrueType font sized to the drawing, so
class names and scores stay legible."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from PIL import Image, ImageFont
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from rcnn_trainer.atomic_io import atomic_save_image

MIN_DRAWN_SIDE = 512   # short side of the drawing; small inputs are upscaled to it
MAX_UPSCALE = 8
GT_COLOUR, PRED_COLOUR = (0, 220, 0), (230, 30, 30)
FONTS = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf")


@functools.lru_cache(maxsize=1)
def _font_file() -> str | None:
    """The first TrueType font PIL finds; None: torchvision falls back to PIL's bundled font."""
    for name in FONTS:
        try:
            ImageFont.truetype(name, 12)
            return name
        except OSError:
            continue
    return None


def draw_detections(image: Image.Image, gt_boxes: list, predictions: list[tuple[list, str]], out: Path,
                    masks: torch.Tensor | None = None) -> None:
    """gt_boxes: xyxy in image pixels; predictions: (xyxy box, label text); masks: bool [D, H, W] of
    the predictions at the image's size, drawn translucent under the boxes. Saved as PNG at `out`."""
    image = image.convert("RGB")
    scale = min(MAX_UPSCALE, max(1.0, MIN_DRAWN_SIDE / min(image.size)))
    size = image.size
    if scale > 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    width = max(2, round(min(image.size) / 256))
    pixels = pil_to_tensor(image)
    if masks is not None and len(masks):
        if image.size != size:  # nearest: the mask's edges stay where the predicted pixels are
            masks = torch.nn.functional.interpolate(masks[None].float(), size=(image.height, image.width))[0] > 0.5
        pixels = draw_segmentation_masks(pixels, masks.bool(), alpha=0.45, colors=[PRED_COLOUR] * len(masks))
    if gt_boxes:
        pixels = draw_bounding_boxes(pixels, torch.tensor(gt_boxes, dtype=torch.float32) * scale, colors=GT_COLOUR,
                                     width=width)
    if predictions:
        boxes = torch.tensor([box for box, _ in predictions], dtype=torch.float32) * scale
        pixels = draw_bounding_boxes(pixels, boxes, labels=[text for _, text in predictions], colors=PRED_COLOUR,
                                     width=width, font=_font_file(), font_size=max(12, round(min(image.size) / 36)),
                                     fill_labels=True, label_colors=(255, 255, 255))
    atomic_save_image(to_pil_image(pixels), out)
