"""Drawing boxes on images for people: small images are upscaled first, labels get a filled
background and a TrueType font sized to the drawing, so class names and scores stay legible."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from rcnn_trainer.atomic_io import atomic_save_image

MIN_DRAWN_SIDE = 512   # short side of the drawing; small inputs are upscaled to it
MAX_UPSCALE = 8
GT_COLOUR, PRED_COLOUR = (0, 220, 0), (230, 30, 30)


def _font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font


def draw_detections(image: Image.Image, gt_boxes: list, predictions: list[tuple[list, str]], out: Path) -> None:
    """gt_boxes: xyxy in image pixels; predictions: (xyxy box, label text). Saved as PNG at `out`."""
    image = image.convert("RGB")
    scale = min(MAX_UPSCALE, max(1.0, MIN_DRAWN_SIDE / min(image.size)))
    if scale > 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    width = max(2, round(min(image.size) / 256))
    font = _font(max(12, round(min(image.size) / 36)))
    for box in gt_boxes:
        draw.rectangle([v * scale for v in box], outline=GT_COLOUR, width=width)
    for box, text in predictions:
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=PRED_COLOUR, width=width)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y0 - th - 2 * width if y0 - th - 2 * width >= 0 else y0  # above the box, or inside at the top
        draw.rectangle([x0, ty, x0 + tw + 2 * width, ty + th + 2 * width], fill=PRED_COLOUR)
        draw.text((x0 + width - left, ty + width - top), text, fill=(255, 255, 255), font=font)
    atomic_save_image(image, out)
