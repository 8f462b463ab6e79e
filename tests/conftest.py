"""Shared test helpers: tiny configs on the synthetic data and hand-written COCO files."""

from __future__ import annotations

import copy
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rcnn_trainer.config_loader import deep_merge, validate_config

TINY = {
    "seed": 1,
    "data": {
        "synthetic": {"num_train": 12, "num_val": 6, "image_size": 64, "seed": 3},
        "batch_size": 2, "num_workers": 0, "min_size": 64, "max_size": 64,
    },
    "model": {
        "num_classes": 4,
        "backbone": {"name": "resnet18", "weights": None, "norm": "bn", "fpn_channels": 16},
        "anchors": {"sizes": [[8], [16], [32], [64], [96]]},
        "rpn": {"batch_size_per_image": 64, "pre_nms_top_n_train": 100, "post_nms_top_n_train": 50,
                "pre_nms_top_n_test": 100, "post_nms_top_n_test": 50},
        "roi": {"batch_size_per_image": 32, "representation_size": 32},
    },
    "solver": {"lr": 0.01, "warmup_iters": 2, "max_iters": 4, "schedule": "cosine"},
    "train": {"log_period": 1, "checkpoint_period": 2, "threads": 2},
    "monitor": {"period": 2, "probe_images": 2},
}

# Under pytest-xdist (the README's command runs two workers on two cores) each worker and the
# processes it starts use one thread: two workers at two threads each ran slower than one run.
ONE_THREAD_PER_WORKER = "PYTEST_XDIST_WORKER" in os.environ
if ONE_THREAD_PER_WORKER:
    TINY["train"]["threads"] = 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    # One synthetic cache per test session; never the user's ~/.cache.
    monkeypatch.setenv("RCNN_TRAINER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.manual_seed(0)


@pytest.fixture
def after_forward(monkeypatch):
    """`after_forward(fn)` makes fn(step, losses) run between each forward and the weighted sum
    (step counts from 0 in this process): how tests inject a NaN, a crash or a normalization bug."""
    import rcnn_trainer.train.trainer as trainer_module

    def install(fn):
        real, steps = trainer_module.weighted_total, itertools.count()

        def weighted_total(losses, weights):
            fn(next(steps), losses)
            return real(losses, weights)
        monkeypatch.setattr(trainer_module, "weighted_total", weighted_total)
    return install


class Crash(Exception):
    pass


def crashed_then_resumed(folder: Path, install_after_forward, crash_at: int = 4, **settings) -> None:
    """Train in `folder`, crash after the forward of step `crash_at`, then --resume to the end."""
    from rcnn_trainer.train.trainer import train

    crashed = []

    def crash(step, losses):
        if step == crash_at and not crashed:
            crashed.append(step)
            raise Crash()
    install_after_forward(crash)
    with pytest.raises(Crash):
        train(tiny_config(folder, **settings), log=lambda _: None, progress=False)
    train(tiny_config(folder, **settings), resume=True, log=lambda _: None, progress=False)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(config path, model_final.pth) of one tiny run, shared by the whole session (tests write
    their own outputs elsewhere or into folders the run owns; none changes the run itself)."""
    from rcnn_trainer.cli import train_main

    tmp = tmp_path_factory.mktemp("trained")
    config = write_yaml(tmp / "c.yaml", tiny_dict(tmp))
    assert train_main(["--config", str(config), "--no-progress"]) == 0
    return config, tmp / "run" / "model_final.pth"


def tiny_dict(tmp_path: Path, **updates) -> dict:
    raw = deep_merge(copy.deepcopy(TINY), {"output_dir": str(tmp_path / "run")})
    return deep_merge(raw, updates)


def tiny_config(tmp_path: Path, **updates):
    return validate_config(tiny_dict(tmp_path, **updates), source="test")


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_coco(folder: Path, images: list[dict], annotations: list[dict], categories=None,
               make_files: bool = True, name: str = "ann.json") -> Path:
    """Write a COCO file; images get real (flat grey) PNGs of their declared size."""
    folder.mkdir(parents=True, exist_ok=True)
    categories = categories if categories is not None else [{"id": 7, "name": "a"}, {"id": 3, "name": "b"}]
    if make_files:
        for image in images:
            Image.fromarray(np.full((image["height"], image["width"], 3), 128, np.uint8)).save(folder / image["file_name"])
    path = folder / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def image(i: int, w: int = 40, h: int = 30) -> dict:
    return {"id": i, "file_name": f"im{i}.png", "width": w, "height": h}


def ann(i: int, image_id: int, cat: int, bbox, crowd: int = 0) -> dict:
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": crowd,
            "area": bbox[2] * bbox[3]}


# torchvision's detector defaults in our schema (for the parity tests): 256-channel FPN, its
# anchors, proposal counts, RoI sampling and 1024-wide head; frozen BatchNorm as its backbone
TORCHVISION_SIZES = {"backbone": {"norm": "frozen_bn", "fpn_channels": 256},
                     "anchors": {"sizes": [[32], [64], [128], [256], [512]]},
                     "rpn": {"batch_size_per_image": 256, "pre_nms_top_n_test": 1000, "post_nms_top_n_test": 1000},
                     "roi": {"batch_size_per_image": 512, "representation_size": 1024, "score_thresh": 0.0}}
