"""Experiment trackers fed from metrics.jsonl's records: `logging.writers: [tensorboard, mlflow]`.

  tags.py                metrics.jsonl record -> step, scalars by tag, texts by tag (the tag table)
  hub.py                 Writers: the bounded queue and the background thread that calls each writer
  tensorboard_writer.py  event files in <run folder>/tensorboard (purge_step on resume)
  mlflow_writer.py       one MLflow run per run folder, its id in <run folder>/mlflow_run.json

The trainer builds one `Writers` on rank 0 (no other rank writes), hands it every record that
MetricsLog writes, the dashboard at each judgment, the run's pictures and, at the end, the
checkpoints. docs/writers.md lists the tags and the measured cost.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

from rcnn_trainer.config import Config
from rcnn_trainer.config_loader import config_to_dict, flatten
from rcnn_trainer.run_folder import owned_by_us, safe_name
from rcnn_trainer.writers.hub import Writers

__all__ = ["Writers", "build_writers", "run_pictures", "send_eval_outputs", "TENSORBOARD_DIR"]

TENSORBOARD_DIR = "tensorboard"
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # writer -> the package it needs
IMPORTS = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow.tracking"}  # what its writer imports
MAX_PICTURES = 64  # pictures found in the run folder that are sent (drawings can be many)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def build_writers(cfg: Config, out: Path, say: Callable[[str], None], resume_step: int | None = 0) -> Writers:
    """The configured writers for the run folder `out` (call on rank 0 only). A writer whose
    package is missing is reported once and left out: the run goes on without it.
    `resume_step`: the iteration training starts from; None: add to the folder's runs (rcnn-eval)."""
    backends = []
    for name in cfg.logging.writers:
        problem = None if _installed(PACKAGES[name]) else "is not installed"
        try:  # here, before training: an import in the writers' thread would hold the GIL during the first steps
            if problem is None:
                importlib.import_module(IMPORTS[name])
        except Exception as err:  # noqa: BLE001 - a broken install is reported like a missing one
            problem = f"does not import ({type(err).__name__}: {str(err)[:200]})"
        if problem:
            say(f"[writers] logging.writers lists {name} but the '{PACKAGES[name]}' package {problem} "
                f"(pip install \"rcnn_trainer[{name}]\"); training goes on without it.")
            continue
        if name == "tensorboard":
            from rcnn_trainer.writers.tensorboard_writer import TensorBoardWriter

            backends.append(TensorBoardWriter(Path(out) / TENSORBOARD_DIR))
        else:
            from rcnn_trainer.writers.mlflow_writer import MLflowWriter

            backends.append(MLflowWriter(Path(out), cfg.logging.mlflow.tracking_uri, cfg.logging.mlflow.experiment))
    params = flatten(config_to_dict(cfg)) if resume_step is not None else {}
    writers = Writers(backends, say=say, queue_size=cfg.logging.queue_size, close_timeout_s=cfg.logging.close_timeout_s,
                      resume_step=resume_step, params=params)
    if backends:
        say(f"[writers] every metrics.jsonl record also goes to: {', '.join(writers.names)} (docs/writers.md)")
    return writers


def run_pictures(out: Path) -> list[tuple[str, Path]]:
    """(tag, file) of the pictures the product drew in the run folder: lr_find.png, the eval
    folder's plots (--analyze) and drawings (--visualize); at most MAX_PICTURES, plots first."""
    out = Path(out)
    found = [out / "lr_find.png", *sorted((out / "eval").glob("*.png")), *sorted((out / "eval" / "vis").glob("*.png"))]
    pictures = []
    for path in found:
        if path.is_file() and not path.is_symlink() and len(pictures) < MAX_PICTURES:
            relative = path.relative_to(out).with_suffix("")
            pictures.append(("pictures/" + "/".join(safe_name(part) for part in relative.parts), path))
    return pictures


def send_eval_outputs(cfg: Config, eval_dir: Path, metrics: dict, iteration: int, say: Callable[[str], None]) -> None:
    """rcnn-eval into a run folder's eval/ (its default): the metrics (as `rcnn_eval/...` at the
    checkpoint's iteration) and the pictures it drew (--visualize, --analyze) go to that run's
    TensorBoard and MLflow runs. Elsewhere, or with logging.writers empty, nothing is sent."""
    eval_dir = Path(eval_dir)
    if not cfg.logging.writers or eval_dir.name != "eval" or not owned_by_us(eval_dir.parent):
        return
    links = [name for name in (TENSORBOARD_DIR, "mlruns", "mlflow_run.json") if os.path.islink(eval_dir.parent / name)]
    if links:  # training refuses these too (run_folder.claim_folder): never write through a link
        say(f"[writers] '{eval_dir.parent / links[0]}' is a link: this evaluation is not sent to the trackers.")
        return
    record = {"type": "rcnn_eval", "iter": int(iteration)}
    for key, value in metrics.items():
        if hasattr(value, "as_record"):  # the threshold counts
            record.update(value.as_record())
        elif isinstance(value, dict):  # per_class_AP -> AP/<class>, per_class_segm_AP -> segm_AP/<class>
            record.update({f"{key.removeprefix('per_class_')}/{name}": v for name, v in value.items()})
        else:
            record[key] = value
    writers = build_writers(cfg, eval_dir.parent, say, resume_step=None)
    writers.record(record)
    for tag, path in run_pictures(eval_dir.parent):
        if not tag.startswith("pictures/lr_find"):  # training sent it
            writers.picture(tag, path, int(iteration))
    writers.close()
