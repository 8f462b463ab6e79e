"""rcnn-eval: load a checkpoint, evaluate on val, write results, optionally draw images.

The eval folder is claimed first (run_folder.py): a folder rcnn_trainer did not create that holds
a file eval writes is refused before anything slow runs, unless --overwrite. Names read from the
data (image ids) become file names only through safe_name, after an index that keeps them apart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torchvision.ops import box_convert
from tqdm import tqdm

from rcnn_trainer.atomic_io import atomic_write_text
from rcnn_trainer.config import Config
from rcnn_trainer.config_loader import config_to_dict, flatten
from rcnn_trainer.data.loader import build_dataset, build_eval_loader
from rcnn_trainer.data.masks import rasterize
from rcnn_trainer.data.pixels import to_rgb
from rcnn_trainer.runtime.checkpoint import load_checkpoint
from rcnn_trainer.data.labels import class_order_warning
from rcnn_trainer.data.settings import check_dataset_fits_model
from rcnn_trainer.data.settings import resolve_from_checkpoint
from rcnn_trainer.runtime.device import amp_dtype, autocast_for, pick_device
from rcnn_trainer.analysis.drawing import draw_detections
from rcnn_trainer.infer.evaluate import evaluate, format_metrics
from rcnn_trainer.infer.sliced import sliced_eval
from rcnn_trainer.infer.tta import TTAModel
from rcnn_trainer.errors import UserError
from rcnn_trainer.model.build import build_model
from rcnn_trainer.model.frozen_backbone import freeze_backbone
from rcnn_trainer.monitor.threshold_counts import format_threshold_table
from rcnn_trainer.run_folder import MARKER, claim_folder, owned_by_us, safe_name
from rcnn_trainer.writers import send_eval_outputs

# what rcnn-eval writes into its folder, with --analyze's files (analysis/report.py OUTPUTS)
EVAL_OUTPUTS = ("coco_results.json", "metrics.json", "vis")


def load_model_weights(model: torch.nn.Module, ckpt: dict, cfg: Config, path: Path) -> None:
    """Load, turning a config mismatch into a message instead of a shape-mismatch traceback."""
    saved = flatten(ckpt.get("config", {}).get("model", {}))
    current = flatten(config_to_dict(cfg)["model"])
    differ = [k for k in saved if saved.get(k) != current.get(k) and not k.startswith(("rpn.", "roi.score", "roi.nms", "roi.detections"))]
    try:
        model.load_state_dict(chosen_weights(ckpt, cfg, path))
    except RuntimeError as err:
        hint = ("; ".join(f"model.{k}: checkpoint {saved[k]!r}, config {current.get(k)!r}" for k in differ[:6])
                or str(err).splitlines()[0][:300])
        raise UserError(f"checkpoint '{path}' was trained with a different model than --config describes ({hint}). "
                        f"Evaluate with the config the checkpoint was trained with (its run folder has config.yaml).") from None


def chosen_weights(ckpt: dict, cfg: Config, path: Path, say=print) -> dict:
    """The averaged weights (solver.ema) when the config has them on and the checkpoint holds
    them, else the raw ones; says which when there is a choice."""
    if cfg.solver.ema.enabled and "ema" in ckpt:
        say(f"[weights] the EMA of '{path}' (solver.ema, {ckpt['ema']['updates']} updates)")
        return ckpt["ema"]["weights"]
    if cfg.solver.ema.enabled:
        say(f"[weights] WARNING solver.ema is on but '{path}' holds no average: its raw weights are used")
    elif "ema" in ckpt:
        say(f"[weights] the raw weights of '{path}'; it also holds their EMA: solver.ema.enabled=true uses it")
    return ckpt["model"]


def inference_model(cfg: Config, ckpt: dict, path: Path, device, tta: bool = False, say=print,
                    freeze: bool = False) -> torch.nn.Module:
    """The checkpoint's model for rcnn-eval / rcnn-predict, in eval mode, wrapped for --tta.
    `freeze`: the backbone as a frozen graph where that pays (model/frozen_backbone.py)."""
    model = build_model(cfg.model).to(device).eval()
    load_model_weights(model, ckpt, cfg, path)
    if freeze:
        freeze_backbone(model, device, amp_dtype(device, cfg.solver.amp, cfg.solver.amp_dtype), say=say)
    if not tta:
        return model
    augmented = TTAModel.from_config(model, cfg)
    say(f"[tta] {augmented.describe()}")
    return augmented


def run_evaluation(cfg: Config, checkpoint: Path, out: Path, visualize: int = 0, progress: bool = True,
                   tta: bool = False, analyze: bool = False, analyze_score: float = 0.3, split: str = "val",
                   overwrite: bool = False) -> dict:
    claim_eval_folder(out, overwrite)
    device = pick_device(cfg.train.device)
    val_set = build_dataset(cfg, split, for_eval=True)
    ckpt = load_checkpoint(checkpoint)
    cfg = resolve_from_checkpoint(cfg, ckpt.get("config", {}))
    check_dataset_fits_model(cfg, val_set)
    if (warning := class_order_warning(ckpt.get("class_names"), val_set)) is not None:  # data/labels/
        print(warning)
    model = inference_model(cfg, ckpt, checkpoint, device, tta, freeze=True)
    loader = build_eval_loader(cfg, val_set)
    model, loader = sliced_eval(cfg, model, loader)  # data.tiling: tiles + whole image, merged (infer/sliced.py)
    metrics, results = evaluate(model, val_set, loader, device, cfg.monitor.score_thresholds,
                                progress=progress, autocast=autocast_for(device, cfg.solver.amp, cfg.solver.amp_dtype))
    atomic_write_text(out / "coco_results.json", json.dumps(results))
    atomic_write_text(out / "metrics.json", json.dumps({"checkpoint": str(checkpoint), "tta": tta, **metrics,
                                                           "threshold_counts": metrics["threshold_counts"].as_record()},
                                                          indent=1))
    print(f"[eval] {checkpoint} on {len(val_set)} images of {val_set.ann_file}")
    print(format_metrics(metrics))
    print(format_threshold_table(metrics["threshold_counts"]))
    if visualize:
        written = draw_predictions(val_set, results, out / "vis", visualize)
        print(f"[eval] drew {written} images in {out / 'vis'} (green: ground truth, red: predictions >= 0.5)")
    if analyze:
        from rcnn_trainer.analysis.report import analyze as analyze_results

        analyze_results(val_set, results, out, score=analyze_score, split=split, visualize=visualize)
    send_eval_outputs(cfg, out, metrics, ckpt.get("iteration", 0), say=print)  # logging.writers (writers/)
    print(f"[eval] results: {out / 'coco_results.json'}, metrics: {out / 'metrics.json'}")
    return metrics


def claim_eval_folder(out: Path, overwrite: bool) -> None:
    """Before the evaluation runs: `out` must be new, hold none of eval's files, or be ours (an
    rcnn-eval wrote its marker; or it is the `eval` folder of a run folder of ours, which an earlier
    version filled without a marker of its own)."""
    from rcnn_trainer.analysis.report import OUTPUTS as ANALYZE_OUTPUTS

    out = Path(out)
    ours = out.name == "eval" and owned_by_us(out.parent) and not os.path.lexists(out / MARKER)
    claim_folder(out, "rcnn-eval", [*EVAL_OUTPUTS, *ANALYZE_OUTPUTS], overwrite=overwrite or ours,
                 hint="choose a new or empty --output-dir, or pass --overwrite")


def draw_predictions(dataset, results: list[dict], folder: Path, count: int,
                     min_score: float = 0.5) -> int:
    """Draw the first `count` images as `00000_<image id>.png`: the index keeps two ids apart that
    safe_name makes alike (1 and "1", "a/b" and "a_b")."""
    from PIL import Image

    by_image: dict[int | str, list[dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    names = {cat: dataset.class_names[label - 1] for label, cat in dataset.label_to_cat_id.items()}
    written = 0
    for index, record in enumerate(tqdm(dataset.records[:count], desc="draw", leave=False)):
        with Image.open(record.path) as img:
            image = to_rgb(img)
        shown = [r for r in by_image.get(record.image_id, []) if r["score"] >= min_score]
        xyxy = box_convert(torch.tensor([r["bbox"] for r in shown], dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy")
        preds = [(box, f"{names[r['category_id']]} {r['score']:.2f}") for box, r in zip(xyxy.tolist(), shown)]
        masks = None
        if shown and "segmentation" in shown[0]:  # the results' RLEs, decoded as the loader reads masks
            masks = torch.from_numpy(rasterize([r["segmentation"] for r in shown], record.height, record.width)).bool()
        draw_detections(image, record.boxes.tolist(), preds, folder / f"{index:05d}_{safe_name(record.image_id)}.png",
                        masks=masks)
        written += 1
    return written
