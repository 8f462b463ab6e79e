"""The built-in synthetic dataset: coloured shapes on textured backgrounds.

Deterministic from a seed and written once as real COCO json + PNG files, so it goes through
the same loader (and the same checks) as a user's data. Four classes with imbalanced
frequencies and different size ranges, small objects (~10-20 px) included, and some images
with no objects. The class is the shape, never the colour, so a model has to look at form.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# name, relative frequency, (min, max) size as a fraction of the image side
CLASSES = [
    ("square", 0.40, (0.10, 0.40)),
    ("circle", 0.30, (0.10, 0.40)),
    ("triangle", 0.20, (0.12, 0.40)),
    ("cross", 0.10, (0.15, 0.40)),
]
SMALL_OBJECT_PX = (10, 20)
SMALL_OBJECT_SHARE = 0.25
EMPTY_IMAGE_SHARE = 0.08
MAX_OBJECTS = 6
FORMAT_VERSION = 3  # bump when the generator changes so old caches are not reused (3: segmentations)
ELLIPSE_POINTS = 48  # the polygon of a circle's mask


def default_cache_root() -> Path:
    return Path(os.environ.get("RCNN_TRAINER_CACHE", Path.home() / ".cache" / "rcnn_trainer"))


def ensure_synthetic_dataset(num_train: int, num_val: int, image_size: int, seed: int,
                             cache_dir: Path | None = None) -> Path:
    """Generate (once) and return the folder holding train.json, val.json and images/."""
    params = dict(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
                  version=FORMAT_VERSION)
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir else default_cache_root()
    folder = root / f"synthetic-{key}"
    if (folder / "done").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder and rename: a killed run never leaves a half dataset.
    tmp = Path(tempfile.mkdtemp(prefix=f".synthetic-{key}-", dir=root))
    try:
        (tmp / "images").mkdir()
        rng = np.random.default_rng(seed)
        for split, count in (("train", num_train), ("val", num_val)):
            coco = _generate_split(split, count, image_size, rng, tmp / "images")
            (tmp / f"{split}.json").write_text(json.dumps(coco))
        (tmp / "params.json").write_text(json.dumps(params, indent=1))
        (tmp / "done").write_text("ok\n")
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            if not (folder / "done").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _generate_split(split: str, count: int, size: int, rng: np.random.Generator,
                    image_dir: Path) -> dict:
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, (name, _, _) in enumerate(CLASSES)]
    frequencies = np.array([freq for _, freq, _ in CLASSES])
    frequencies = frequencies / frequencies.sum()
    images, annotations = [], []
    for index in range(count):
        image_id = index + 1
        file_name = f"{split}_{image_id:05d}.png"
        canvas = textured_background(size, rng)
        draw = ImageDraw.Draw(canvas)
        num_objects = 0 if rng.random() < EMPTY_IMAGE_SHARE else int(rng.integers(1, MAX_OBJECTS + 1))
        placed: list[tuple[float, float, float, float]] = []
        for _ in range(num_objects):
            label = int(rng.choice(len(CLASSES), p=frequencies))
            box = _place(size, CLASSES[label][2], placed, rng)
            if box is None:
                continue
            placed.append(box)
            _draw_shape(draw, CLASSES[label][0], box, rng)
            x0, y0, x1, y1 = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                "segmentation": [shape_polygon(CLASSES[label][0], box)],
            })
        canvas.save(image_dir / file_name, optimize=False)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    return {"images": images, "annotations": annotations, "categories": categories,
            "info": {"description": f"rcnn_trainer synthetic shapes ({split})"}}


def textured_background(size: int, rng: np.random.Generator) -> Image.Image:
    """Low-frequency colour blobs + a gradient + pixel noise + a few thin lines."""
    coarse = rng.uniform(40, 200, size=(4, 4, 3)).astype(np.float32)
    blobs = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BICUBIC),
                       dtype=np.float32)
    ramp = np.linspace(-25, 25, size, dtype=np.float32)
    gradient = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
    noise = rng.normal(0, 12, size=(size, size, 3)).astype(np.float32)
    pixels = np.clip(blobs + gradient + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):
        points = [tuple(float(v) for v in rng.uniform(0, size, 2)) for _ in range(2)]
        draw.line(points, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=1)
    return image


def _place(size: int, size_range: tuple[float, float], placed: list, rng: np.random.Generator):
    """A box that overlaps no placed box by more than a sliver, or None after 20 tries."""
    for _ in range(20):
        if rng.random() < SMALL_OBJECT_SHARE:
            side = float(rng.uniform(*SMALL_OBJECT_PX))
        else:
            side = float(rng.uniform(*size_range) * size)
        aspect = float(rng.uniform(0.75, 1.33))
        w, h = min(side * aspect, size - 2), min(side / aspect, size - 2)
        x0, y0 = float(rng.uniform(0, size - w)), float(rng.uniform(0, size - h))
        box = (round(x0, 1), round(y0, 1), round(x0 + w, 1), round(y0 + h, 1))
        if all(overlap_share(box, other) < 0.15 for other in placed):
            return box
    return None


def overlap_share(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(smaller, 1e-6)


def shape_polygon(shape: str, box) -> list[float]:
    """The outline of a drawn shape as a COCO polygon [x1, y1, x2, y2, ...]: its exact mask (the
    circle's as a 48-gon)."""
    x0, y0, x1, y1 = box
    if shape == "square":
        points = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    elif shape == "circle":
        angles = np.linspace(0, 2 * np.pi, ELLIPSE_POINTS, endpoint=False)
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        points = list(zip(cx + rx * np.cos(angles), cy + ry * np.sin(angles)))
    elif shape == "triangle":
        points = [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    elif shape == "cross":
        tw, th = (x1 - x0) / 3, (y1 - y0) / 3
        points = [(x0 + tw, y0), (x1 - tw, y0), (x1 - tw, y0 + th), (x1, y0 + th), (x1, y1 - th), (x1 - tw, y1 - th),
                  (x1 - tw, y1), (x0 + tw, y1), (x0 + tw, y1 - th), (x0, y1 - th), (x0, y0 + th), (x0 + tw, y0 + th)]
    else:
        raise ValueError(f"unknown shape {shape}")
    return [round(float(v), 2) for point in points for v in point]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, rng: np.random.Generator) -> None:
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "cross":
        tw, th = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle((x0 + tw, y0, x1 - tw, y1), fill=colour)
        draw.rectangle((x0, y0 + th, x1, y1 - th), fill=colour)
    else:  # the square and the triangle are their polygons
        points = shape_polygon(shape, box)
        draw.polygon(list(zip(points[0::2], points[1::2])), fill=colour)
