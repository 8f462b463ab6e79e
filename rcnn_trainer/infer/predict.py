"""rcnn-predict: run a trained checkpoint on image files, folders or globs.

Writes into --output-dir (a folder it claims, see run_folder.py):
- `predictions.jsonl`: one line per input image, appended as each batch completes, so a killed
  run keeps every image but the batch in flight: {"file_name", "detections": [...]} or, for an
  image that was skipped, {"file_name", "skipped": why}.
- `predictions.json`: all detections as one list, written atomically at the end: the same dicts
  as the lines' detections (file name, original category id and name, box [x, y, w, h] in
  original image pixels, score, and with a mask head `segmentation` as COCO RLE of the mask at 0.5).
- `summary.json`: the counts, and each skipped image with its reason.
- `vis/`: drawn images (masks translucent), named NNNNN_<file stem>.png.
One image that cannot be read (corrupt, truncated, a decompression bomb, a folder, unreadable)
or that the model runs out of memory on is reported and skipped; none left is a UserError (exit 2).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torchvision.ops import box_convert
from tqdm import tqdm

from rcnn_trainer.atomic_io import append_line, atomic_write_text
from rcnn_trainer.config import Config
from rcnn_trainer.data.pixels import read_rgb
from rcnn_trainer.data.tiling import allow_large_images
from rcnn_trainer.data.transforms import build_transforms
from rcnn_trainer.runtime.checkpoint import load_checkpoint
from rcnn_trainer.data.settings import resolve_from_checkpoint
from rcnn_trainer.runtime.device import autocast_for, pick_device
from rcnn_trainer.analysis.drawing import draw_detections
from rcnn_trainer.infer.evaluate import masks_to_rles
from rcnn_trainer.infer.run_eval import inference_model
from rcnn_trainer.infer.sliced import SlicedModel, ToUint8Tensor
from rcnn_trainer.errors import UserError
from rcnn_trainer.run_folder import claim_folder, safe_name

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
OUTPUTS = ("predictions.json", "predictions.jsonl", "summary.json", "vis")  # what rcnn-predict writes


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


def class_mapping(ckpt: dict, num_classes: int) -> tuple[dict[int, int], list[str]]:
    """label 1..C -> original category id, and class names; checkpoints converted from
    torchvision weights hold neither: ids 1..C and names 'class_<id>'."""
    to_cat = {int(k): int(v) for k, v in (ckpt.get("label_to_cat_id") or {}).items()}
    if len(to_cat) != num_classes:
        to_cat = {label: label for label in range(1, num_classes + 1)}
    names = ckpt.get("class_names") or [f"class_{to_cat[label]}" for label in range(1, num_classes + 1)]
    return to_cat, list(names)


def prepare_output_dir(out: Path, overwrite: bool = False) -> None:
    """Claim `out` for rcnn-predict, or refuse before any work: a folder we did not create that
    holds what we write, earlier predictions (ours too: never silently replaced) unless
    `overwrite`, or a folder we cannot write into."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write predictions to --output-dir '{out}': {err.strerror or err}") from None
    hint = "pass another --output-dir, or --overwrite to replace them"
    ours = claim_folder(out, "rcnn-predict", OUTPUTS, overwrite=overwrite, hint=hint)
    earlier = [name for name in ("predictions.json", "predictions.jsonl") if os.path.lexists(out / name)]
    if ours and earlier and not overwrite:
        interrupted = "" if "predictions.json" in earlier else " (from a run that did not finish)"
        raise UserError(f"'{out / earlier[0]}' already exists{interrupted}: pass another --output-dir, or "
                        "--overwrite to replace it (earlier predictions are never overwritten silently).")
    try:
        # reached with --overwrite or nothing there: the earlier run's files go now (the jsonl is
        # appended to), so that a run killed later never leaves its lines beside their results
        for name in ("predictions.json", "predictions.jsonl", "summary.json"):
            (out / name).unlink(missing_ok=True)
        (out / "vis").mkdir(exist_ok=True)
        probe_file = out / ".write_test"
        probe_file.write_text("")
        probe_file.unlink()
    except OSError as err:
        raise UserError(f"cannot write predictions to --output-dir '{out}': {err.strerror or err}") from None


def _out_of_memory(err: RuntimeError) -> bool:
    text = str(err)
    return (isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text
            or "can't allocate memory" in text)  # the CPU allocator's words


def detect(model, tensors: list[torch.Tensor], sizes: list[tuple[int, int]], autocast) -> list[dict | str]:
    """The model's detections for each image, or why it failed on that image. A batch that runs
    out of memory is retried image by image, so one huge image costs only itself; any other
    error is a bug, not a property of an image, and stops the run (predictions.jsonl keeps the
    images done before it)."""
    try:
        with torch.no_grad(), autocast():
            return model(tensors, original_sizes=sizes)
    except RuntimeError as err:
        if not _out_of_memory(err):
            raise
        if len(tensors) == 1:
            return [f"the model ran out of memory on it ({str(err).splitlines()[0][:200]})"]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [outcome for tensor, size in zip(tensors, sizes) for outcome in detect(model, [tensor], [size], autocast)]


def run_prediction(cfg: Config, checkpoint: Path, inputs: list[str], out: Path, score_thresh: float = 0.5,
                   draw: bool = True, progress: bool = True, log=print, tta: bool = False,
                   overwrite: bool = False) -> dict:
    """Returns the summary (also written to summary.json): images, detections, score_thresh,
    skipped (a count) and skipped_images ({file_name, reason} each)."""
    paths = expand_inputs(inputs)
    if not paths:
        raise UserError(f"no image found in {', '.join(inputs)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
    prepare_output_dir(out, overwrite)
    predictor = load_predictor(cfg, checkpoint, tta, log)
    predictions = Predictions(out, log)
    batch = predictor.batch_size
    bar = tqdm(total=len(paths), desc="predict", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(paths), batch):
        predict_batch(predictor, paths[start:start + batch], score_thresh, predictions, draw)
        bar.update(len(paths[start:start + batch]))
    bar.close()
    return finish_predictions(predictions, len(paths), score_thresh, draw)


@dataclass
class Predictor:
    """A checkpoint ready to run: the model, how an image becomes its input, and what its labels mean."""
    model: torch.nn.Module
    device: torch.device
    transform: Callable  # the evaluation transform: (PIL image, target, None) -> (tensor [3, H, W], target)
    autocast: Callable[[], ContextManager]
    to_cat: dict[int, int]  # label 1..C -> original category id
    names: list[str]  # class names, index label - 1
    batch_size: int  # data.batch_size


def load_predictor(cfg: Config, checkpoint: Path, tta: bool, log) -> Predictor:
    """The checkpoint's model with the settings it was trained with (its resolved `auto` values)."""
    ckpt = load_checkpoint(checkpoint)
    cfg = resolve_from_checkpoint(cfg, ckpt.get("config", {}))
    device = pick_device(cfg.train.device)
    model = inference_model(cfg, ckpt, checkpoint, device, tta, say=log, freeze=True)
    to_cat, names = class_mapping(ckpt, cfg.model.num_classes)
    transform = build_transforms(cfg.data.test_min_size, cfg.data.max_size, 0.0, train=False)
    if cfg.data.tiling is not None:  # sliced: full-resolution uint8 in, tiles + whole image, merged (infer/sliced.py)
        allow_large_images(cfg.data.tiling.max_image_megapixels)
        model, transform = SlicedModel.from_config(model, cfg), ToUint8Tensor()
    return Predictor(model=model, device=device, transform=transform,
                     autocast=autocast_for(device, cfg.solver.amp, cfg.solver.amp_dtype),
                     to_cat=to_cat, names=names, batch_size=cfg.data.batch_size)


@dataclass
class Predictions:
    """What rcnn-predict has written so far: predictions.jsonl grows by one line per image, as it is done."""
    out: Path
    log: Callable[[str], None]
    results: list[dict] = field(default_factory=list)  # every detection kept, in input order
    skipped: list[dict] = field(default_factory=list)  # {file_name, reason} per image skipped
    done: int = 0  # images predicted

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append({"file_name": str(path), "reason": reason})
        append_line(self.out / "predictions.jsonl", json.dumps({"file_name": str(path), "skipped": reason}))
        self.log(f"[predict] skipped {path}: {reason}")

    def add(self, path: Path, found: list[dict]) -> None:
        append_line(self.out / "predictions.jsonl", json.dumps({"file_name": str(path), "detections": found}))
        self.results += found
        self.done += 1


def predict_batch(predictor: Predictor, paths: list[Path], score_thresh: float, predictions: Predictions,
                  draw: bool) -> None:
    """Read, run and record one batch of images; an image that cannot be read or run is skipped."""
    loaded = []
    for path in paths:
        image = read_rgb(path)
        if isinstance(image, str):
            predictions.skip(path, image)
        else:
            loaded.append((path, image))
    tensors = [predictor.transform(img, {"boxes": torch.zeros(0, 4)}, None)[0].to(predictor.device)
               for _, img in loaded]
    sizes = [(img.height, img.width) for _, img in loaded]
    outcomes = detect(predictor.model, tensors, sizes, predictor.autocast) if loaded else []
    for (path, image), det in zip(loaded, outcomes):
        if isinstance(det, str):
            predictions.skip(path, det)
            continue
        found, boxes, masks = detection_records(det, path, score_thresh, predictor.to_cat, predictor.names)
        predictions.add(path, found)
        if draw:
            draw_detections(image, [], [(box, f"{r['category_name']} {r['score']:.2f}")
                                        for box, r in zip(boxes.tolist(), found)],
                            predictions.out / "vis" / f"{predictions.done:05d}_{safe_name(path.stem)}.png",
                            masks=None if masks is None else masks[:, 0].float().cpu() >= 0.5)


def detection_records(det: dict, path: Path, score_thresh: float, to_cat: dict[int, int],
                      names: list[str]) -> tuple[list[dict], torch.Tensor, torch.Tensor | None]:
    """One image's detections with score >= score_thresh as predictions.json records, with their
    boxes (xyxy, original pixels, [K, 4]) and masks ([K, 1, H, W] or None) for drawing."""
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
    if "rles" in det:  # sliced inference: already in original pixels (masks are not drawn)
        for result, rle in zip(found, [r for r, k in zip(det["rles"], keep.tolist()) if k]):
            result["segmentation"] = rle
    return found, boxes, masks


def finish_predictions(predictions: Predictions, num_inputs: int, score_thresh: float, draw: bool) -> dict:
    """summary.json always; predictions.json (atomically) unless no image could be predicted."""
    out, results, skipped, done = predictions.out, predictions.results, predictions.skipped, predictions.done
    summary = {"images": done, "skipped": len(skipped), "detections": len(results), "score_thresh": score_thresh,
               "skipped_images": skipped}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    if not done:
        first = skipped[0]
        raise UserError(f"none of the {num_inputs} input images could be read or predicted; first problem: "
                        f"{first['file_name']}: {first['reason']} (all in '{out / 'summary.json'}').")
    atomic_write_text(out / "predictions.json", json.dumps(results, indent=1))
    skipped_note = f", {len(skipped)} unreadable images skipped (reasons in {out / 'summary.json'})" if skipped else ""
    predictions.log(f"[predict] {done} images, {len(results)} detections with score >= {score_thresh:g}{skipped_note}"
                    + f"; results: {out / 'predictions.json'}" + (f", drawings: {out / 'vis'}" if draw else ""))
    return summary
