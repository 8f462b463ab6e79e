"""rcnn-predict: run a trained checkpoint on image files, folders or globs.

Writes `predictions.json` (COCO-style results: file name, original category id and name, box
[x, y, w, h] in original image pixels, score, and with a mask head `segmentation` as COCO RLE of
the mask at 0.5) and drawn images (masks translucent). Unreadable images are reported
and skipped; none readable is a UserError (exit 2).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.ops import box_convert
from tqdm import tqdm

from rcnn_trainer.atomic_io import atomic_write_text
from rcnn_trainer.config import Config
from rcnn_trainer.data.pixels import to_rgb
from rcnn_trainer.data.transforms import build_transforms
from rcnn_trainer.engine.checkpoint import load_checkpoint
from rcnn_trainer.engine.data_settings import resolve_from_checkpoint
from rcnn_trainer.engine.device import autocast_for, pick_device
from rcnn_trainer.engine.drawing import draw_detections
from rcnn_trainer.engine.evaluate import masks_to_rles
from rcnn_trainer.engine.run_eval import inference_model
from rcnn_trainer.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders' images (sorted, not recursive), glob patterns expanded."""
    paths, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            paths.append(path)
        elif any(c in item for c in "*?["):
            paths += sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        else:
            missing.append(item)
    if missing:
        raise UserError(f"input {', '.join(repr(m) for m in missing[:5])} is not a file, folder or glob that matches.")
    seen: set = set()
    return [p for p in paths if not (p in seen or seen.add(p))]


def read_image(path: Path) -> Image.Image | str:
    """The image as RGB, or why it could not be read."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        return f"{path}: could not be read as an image ({err})"


def class_mapping(ckpt: dict, num_classes: int) -> tuple[dict[int, int], list[str]]:
    """label 1..C -> original category id, and class names; checkpoints converted from
    torchvision weights hold neither: ids 1..C and names 'class_<id>'."""
    to_cat = {int(k): int(v) for k, v in (ckpt.get("label_to_cat_id") or {}).items()}
    if len(to_cat) != num_classes:
        to_cat = {label: label for label in range(1, num_classes + 1)}
    names = ckpt.get("class_names") or [f"class_{to_cat[label]}" for label in range(1, num_classes + 1)]
    return to_cat, list(names)


def prepare_output_dir(out: Path) -> None:
    """Refuse before any work when the results could not be written or would replace earlier ones."""
    if (out / "predictions.json").exists():
        raise UserError(f"'{out / 'predictions.json'}' already exists: pass another --output-dir or delete it "
                        "(earlier predictions are never overwritten).")
    try:
        (out / "vis").mkdir(parents=True, exist_ok=True)
        probe_file = out / ".write_test"
        probe_file.write_text("")
        probe_file.unlink()
    except OSError as err:
        raise UserError(f"cannot write predictions to --output-dir '{out}': {err.strerror or err}") from None


def run_prediction(cfg: Config, checkpoint: Path, inputs: list[str], out: Path, score_thresh: float = 0.5,
                   draw: bool = True, progress: bool = True, log=print, tta: bool = False) -> dict:
    paths = expand_inputs(inputs)
    if not paths:
        raise UserError(f"no image found in {', '.join(inputs)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
    prepare_output_dir(out)
    ckpt = load_checkpoint(checkpoint)
    cfg = resolve_from_checkpoint(cfg, ckpt.get("config", {}))
    device = pick_device(cfg.train.device)
    model = inference_model(cfg, ckpt, checkpoint, device, tta, say=log, freeze=True)
    to_cat, names = class_mapping(ckpt, cfg.model.num_classes)
    transform = build_transforms(cfg.data.test_min_size, cfg.data.max_size, 0.0, train=False)
    autocast = autocast_for(device, cfg.solver.amp, cfg.solver.amp_dtype)
    results, skipped, done = [], [], 0
    batch = cfg.data.batch_size
    bar = tqdm(total=len(paths), desc="predict", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(paths), batch):
        loaded = []
        for path in paths[start:start + batch]:
            image = read_image(path)
            if isinstance(image, str):
                skipped.append(image)
                log(f"[predict] skipped {image}")
            else:
                loaded.append((path, image))
        if loaded:
            tensors = [transform(img, {"boxes": torch.zeros(0, 4)}, None)[0].to(device) for _, img in loaded]
            with torch.no_grad(), autocast():
                detections = model(tensors, original_sizes=[(img.height, img.width) for _, img in loaded])
            for (path, image), det in zip(loaded, detections):
                keep = det["scores"].float() >= score_thresh
                boxes = det["boxes"][keep].float()
                found = [{"file_name": str(path), "category_id": to_cat[int(label)],
                          "category_name": names[int(label) - 1], "bbox": [round(v, 2) for v in xywh],
                          "score": round(score, 5)}
                         for xywh, label, score in zip(box_convert(boxes, "xyxy", "xywh").tolist(),
                                                       det["labels"][keep].tolist(), det["scores"][keep].float().tolist())]
                masks = det["masks"][keep] if "masks" in det else None
                if masks is not None:
                    for result, rle in zip(found, masks_to_rles(masks)):
                        result["segmentation"] = rle
                results += found
                done += 1
                if draw:
                    draw_detections(image, [], [(box, f"{r['category_name']} {r['score']:.2f}")
                                                for box, r in zip(boxes.tolist(), found)],
                                    out / "vis" / f"{done:05d}_{path.stem}.png",
                                    masks=None if masks is None else masks[:, 0].float().cpu() >= 0.5)
        bar.update(len(paths[start:start + batch]))
    bar.close()
    if not done:
        raise UserError(f"none of the {len(paths)} input images could be read; first problem: {skipped[0]}")
    atomic_write_text(out / "predictions.json", json.dumps(results, indent=1))
    summary = {"images": done, "skipped": len(skipped), "detections": len(results), "score_thresh": score_thresh}
    log(f"[predict] {done} images, {len(results)} detections with score >= {score_thresh:g}"
        + (f", {len(skipped)} unreadable images skipped" if skipped else "")
        + f"; results: {out / 'predictions.json'}" + (f", drawings: {out / 'vis'}" if draw else ""))
    return summary
