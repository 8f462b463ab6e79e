"""Benchmark datasets built from content this project did not draw, written as COCO json + PNGs.

  python tools/bench_datasets.py digits --out data/bench/digits      # needs scikit-learn (".[bench]")
  python tools/bench_datasets.py glyphs --out data/bench/glyphs      # needs a TrueType font (DejaVu)
  python tools/bench_datasets.py digits_large --out data/bench/digits_large

- digits: scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 10 classes), upscaled
  to 12-56 px and pasted in random colours onto textured backgrounds; train and val images use
  disjoint scans (so val holds writers' samples never seen in training). Class frequencies are
  imbalanced (digit 0 about 8x as frequent as digit 9), 1-8 objects per image, 8% empty images.
- glyphs: 26 capital letters rendered from the installed TrueType fonts (several faces: sans,
  serif, mono, bold, oblique), 8-150 px tall, rotated up to 15 degrees, 0-20 per image, Zipf
  class frequencies (A about 20x as frequent as Z). Boxes are the ink's tight box.
- Every object has its exact mask as `segmentation` (COCO RLE): the ink of the scan or the letter.
- digits_large, glyphs_large: the same content, easier: the first 5 digits / 6 letters, objects
  28-84 / 24-100 px, at most 5 / 8 per image. A recipe learns them within a few hundred
  iterations on a CPU, so they serve as healthy runs (tools/pathology_suite.py) on real content.

Both are deterministic from --seed (same seed, same bytes). The built-in synthetic shapes
(data.synthetic in config.yaml) are the third dataset of tools/recipe_bench.py.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rcnn_trainer.data.synthetic import overlap_share, textured_background

FONT_DIRS = [Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype"), Path("/usr/share/fonts"),
             Path("/usr/local/share/fonts"), Path.home() / ".fonts"]


@dataclass(frozen=True)
class Spec:
    content: str  # "digits" (scikit-learn scans) or "glyphs" (TrueType letters)
    size: int  # image side in pixels
    classes: int  # the first N digits / letters
    heights: tuple  # object height range in pixels (digits: uniform; glyphs: log-uniform)
    max_objects: int  # per image
    # Digits and letters are not left-right symmetric: a mirrored "2" is no digit (and a
    # mirrored "J" looks like an "L"). Flip augmentation teaches the wrong thing there.
    mirror_safe: bool = False


SPECS = {
    "digits": Spec("digits", 320, 10, (12, 56), 8),
    "glyphs": Spec("glyphs", 256, 26, (8, 150), 20),
    "digits_large": Spec("digits", 256, 5, (28, 84), 5),
    "glyphs_large": Spec("glyphs", 256, 6, (24, 100), 8),
}


def write_split(out: Path, split: str, images: list, annotations: list, categories: list) -> None:
    (out / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                   "categories": categories}))


def place_box(size: int, w: float, h: float, placed: list, rng: np.random.Generator):
    """A position for a w x h box overlapping placed boxes by less than 15%, or None."""
    for _ in range(20):
        x0, y0 = float(rng.uniform(0, size - w)), float(rng.uniform(0, size - h))
        box = (x0, y0, x0 + w, y0 + h)
        if all(overlap_share(box, other) < 0.15 for other in placed):
            return box
    return None


def paste_mask(canvas: Image.Image, mask: Image.Image, x0: float, y0: float, rng: np.random.Generator) -> None:
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    canvas.paste(Image.new("RGB", mask.size, colour), (int(round(x0)), int(round(y0))), mask)


def compose(out: Path, split: str, count: int, size: int, rng: np.random.Generator, categories: list,
            frequencies: np.ndarray, objects_per_image, render, empty_share: float) -> None:
    """Images with objects drawn by `render(label, rng) -> L-mode mask` (its tight box is the GT)."""
    images, annotations = [], []
    for index in range(count):
        canvas = textured_background(size, rng)
        placed: list = []
        num = 0 if rng.random() < empty_share else objects_per_image(rng)
        for _ in range(num):
            label = int(rng.choice(len(categories), p=frequencies))
            mask = render(label, rng)
            if mask.width >= size or mask.height >= size:
                continue
            box = place_box(size, mask.width, mask.height, placed, rng)
            if box is None:
                continue
            placed.append(box)
            paste_mask(canvas, mask, box[0], box[1], rng)
            x0, y0 = int(round(box[0])), int(round(box[1]))
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": categories[label]["id"],
                                "bbox": [x0, y0, mask.width, mask.height], "area": mask.width * mask.height,
                                "iscrowd": 0, "segmentation": ink_rle(mask, x0, y0, size)})
        name = f"{split}_{index + 1:05d}.png"
        canvas.save(out / "images" / name)
        images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
    write_split(out, split, images, annotations, categories)


def ink_rle(mask: Image.Image, x0: int, y0: int, size: int) -> dict:
    """The object's exact mask as COCO RLE: the pixels where its ink covers more than half (the
    pasted alpha above 127), in image coordinates."""
    from pycocotools import mask as mask_utils

    full = np.zeros((size, size), dtype=np.uint8, order="F")
    ink = np.asarray(mask) > 127
    h, w = min(ink.shape[0], size - y0), min(ink.shape[1], size - x0)
    full[y0:y0 + h, x0:x0 + w] = ink[:h, :w]
    rle = mask_utils.encode(full)
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def tight(mask: Image.Image) -> Image.Image:
    box = mask.point(lambda v: 255 if v > 64 else 0).getbbox()
    return mask.crop(box) if box else mask


# --------------------------------------------------------------------------- digits
def make_digits(out: Path, num_train: int, num_val: int, size: int, seed: int, spec: Spec) -> None:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("error: the digits dataset needs scikit-learn: pip install -c constraints.txt '.[bench]'")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    cut = int(0.75 * len(order))
    pools = {"train": order[:cut], "val": order[cut:]}  # disjoint scans for train and val
    by_class = {split: [[i for i in pool if digits.target[i] == c] for c in range(spec.classes)]
                for split, pool in pools.items()}
    categories = [{"id": c + 1, "name": str(c)} for c in range(spec.classes)]
    frequencies = 0.8 ** np.arange(spec.classes)
    frequencies /= frequencies.sum()

    def renderer(split):
        def render(label, rng):
            scan = digits.images[rng.choice(by_class[split][label])] / 16.0
            height = int(rng.uniform(*spec.heights))
            width = max(6, int(height * rng.uniform(0.7, 1.0)))
            mask = Image.fromarray((scan * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
            return tight(mask)
        return render

    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        compose(out, split, count, size, rng, categories, frequencies, lambda r: int(r.integers(1, spec.max_objects + 1)),
                renderer(split), empty_share=0.08)


# --------------------------------------------------------------------------- glyphs
def find_fonts() -> list[Path]:
    found = []
    for folder in FONT_DIRS:
        if folder.is_dir():
            found += sorted(p for p in folder.rglob("*.ttf") if "Math" not in p.name and "ExtraLight" not in p.name)
        if len(found) >= 4:
            break
    return sorted(set(found))[:12]


def make_glyphs(out: Path, num_train: int, num_val: int, size: int, seed: int, spec: Spec) -> None:
    fonts = find_fonts()
    if not fonts:
        sys.exit("error: no TrueType font found under " + ", ".join(str(d) for d in FONT_DIRS)
                 + "; install one (Debian: apt-get install fonts-dejavu-core) or skip the glyphs dataset.")
    print(f"[glyphs] {len(fonts)} fonts: {', '.join(f.stem for f in fonts)}")
    rng = np.random.default_rng(seed)
    letters = string.ascii_uppercase[:spec.classes]
    categories = [{"id": 100 + 3 * i, "name": c} for i, c in enumerate(letters)]  # non-contiguous ids
    frequencies = 1.0 / np.arange(1, len(letters) + 1) ** 0.9
    frequencies /= frequencies.sum()
    cache: dict = {}

    def render(label, rng):
        height = int(np.exp(rng.uniform(*np.log(spec.heights))))  # log-uniform: many small objects
        font_path = fonts[int(rng.integers(len(fonts)))]
        key = (font_path, label)
        if key not in cache:  # render once large, then scale: fast and the same shape at every size
            font = ImageFont.truetype(str(font_path), 96)
            glyph = Image.new("L", (160, 160), 0)
            ImageDraw.Draw(glyph).text((20, 10), letters[label], fill=255, font=font)
            cache[key] = glyph
        glyph = cache[key].rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        glyph = tight(glyph)
        width = max(2, int(round(glyph.width * height / glyph.height)))
        return glyph.resize((width, height), Image.BILINEAR)

    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        compose(out, split, count, size, rng, categories, frequencies,
                lambda r: int(min(spec.max_objects, r.geometric(0.15))), render, empty_share=0.05)


MAKERS = {"digits": make_digits, "glyphs": make_glyphs}


def ensure(name: str, out: Path, num_train: int = 400, num_val: int = 100, size: int | None = None,
           seed: int = 0) -> Path:
    """Generate once; a `done` file with the parameters marks a complete dataset."""
    spec = SPECS[name]
    params = {"name": name, "num_train": num_train, "num_val": num_val, "size": size or spec.size, "seed": seed,
              "masks": 1}  # each object's ink as its segmentation (the images are the same as before)
    if name not in ("digits", "glyphs"):  # the first two keep their original marker
        params["spec"] = json.loads(json.dumps(asdict(spec)))
    done = out / "done"
    if done.is_file() and json.loads(done.read_text()) == params:
        return out
    MAKERS[spec.content](out, num_train, num_val, params["size"], seed, spec)
    done.write_text(json.dumps(params))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(SPECS))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--size", type=int, help="image side in pixels (default: the dataset's, e.g. digits 320)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    folder = ensure(args.name, args.out, args.num_train, args.num_val, args.size, args.seed)
    print(f"[{args.name}] COCO json + images in '{folder}' (train.json, val.json, images/)")


if __name__ == "__main__":
    main()
