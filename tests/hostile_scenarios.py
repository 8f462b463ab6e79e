"""Fixed hostile scenarios (issue 37): a file planted in the torch hub cache where torchvision's
ImageNet weights go, links and odd files planted in a run folder before it is claimed and
locked, and a real tiny training run into run folders holding planted links and the user's
files. Each asserts its outcome, that nothing is written outside the folder it may write, and
that the user's files are unchanged. Shared by tests/test_hostile_inputs.py and
tools/hostile_inputs.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fs_guard import changes, guarded, plant_user_files, snapshot


class Payload:
    """Pickled, it runs `touch marker` when unpickled by anything but a weights-only loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


HUB_PLANTS = ("pickle", "wrong_weights", "link_to_user_file", "directory", "empty", "fifo", "garbage",
              "checkpoints_is_file")


def try_hub_cache(plant: str, sandbox: Path) -> str:
    """`model.backbone.weights: imagenet` with a file planted in $TORCH_HOME/hub/checkpoints under
    torchvision's name: a UserError, the payload never run, nothing changed."""
    from urllib.parse import urlparse

    import torch
    from conftest import tiny_dict

    from rcnn_trainer.config_loader import validate_config
    from rcnn_trainer.errors import UserError
    from rcnn_trainer.model.build import build_model
    from rcnn_trainer.model.imagenet_weights import published_url

    sandbox.mkdir(parents=True)
    plant_user_files(sandbox)
    home, marker = sandbox / "torch_home", sandbox / "pwned"
    checkpoints = home / "hub" / "checkpoints"
    cached = checkpoints / os.path.basename(urlparse(published_url("resnet18")).path)
    checkpoints.parent.mkdir(parents=True)
    if plant == "checkpoints_is_file":
        checkpoints.write_bytes(b"not a folder")
    else:
        checkpoints.mkdir()
    if plant == "pickle":
        torch.save({"conv1.weight": Payload(marker)}, cached)
    elif plant == "wrong_weights":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, cached)
    elif plant == "link_to_user_file":
        cached.symlink_to(sandbox / "user" / "notes.txt")
    elif plant == "directory":
        cached.mkdir()
    elif plant == "empty":
        cached.write_bytes(b"")
    elif plant == "fifo":
        os.mkfifo(cached)
    elif plant == "garbage":
        cached.write_bytes(bytes(range(256)) * 100)
    cfg = validate_config(tiny_dict(sandbox, model={"backbone": {"weights": "imagenet"}}), source="hostile_inputs")
    before = snapshot(sandbox)
    previous = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)
    try:
        with guarded(writable=(home,)) as guard:  # the hub may download into its cache, nowhere else
            try:
                build_model(cfg.model)
                outcome = "loaded"
            except UserError:
                outcome = "user_error"
    finally:
        if previous is None:
            os.environ.pop("TORCH_HOME")
        else:
            os.environ["TORCH_HOME"] = previous
    assert outcome == "user_error", f"a planted '{plant}' loaded as ImageNet weights"
    assert not marker.exists(), "the planted pickle ran its payload"
    assert not guard.violations, guard.violations[:3]
    found = changes(before, snapshot(sandbox))
    assert not found, found[:5]
    return outcome


RUN_PLANTS = ("lock_link", "lock_link_ours", "lock_dir_link_ours", "lock_dangling_ours", "lock_fifo_ours",
              "lock_dir_ours", "metrics_link", "config_link", "checkpoints_link", "checkpoints_link_ours",
              "metrics_link_ours", "marker_link", "marker_dir", "marker_big", "marker_fifo", "marker_not_json")


def try_run_folder(plant: str, sandbox: Path) -> str:
    """claim_folder + RunLock (what rcnn-train does first) on a run folder with a link or an odd
    file planted (each of RUN_PLANTS is refused: 'user_error'); nothing written outside the
    folder, the user's files unchanged."""
    from rcnn_trainer.errors import UserError
    from rcnn_trainer.run_folder import (
        MARKER,
        TRAIN_OUTPUTS,
        _write_marker,
        claim_folder,
    )
    from rcnn_trainer.train.run_lock import RunLock

    sandbox.mkdir(parents=True)
    plant_user_files(sandbox)
    run, target = sandbox / "run", sandbox / "user" / "notes.txt"
    run.mkdir()
    if plant.endswith("_ours"):
        _write_marker(run / MARKER, "rcnn-train")
    what, _, _ = plant.removesuffix("_ours").partition("_")
    name = {"lock": ".lock", "metrics": "metrics.jsonl", "config": "config.yaml", "checkpoints": "checkpoints",
            "marker": MARKER}[what]
    form = plant.removesuffix("_ours").split("_", 1)[1]
    if form == "link":
        (run / name).symlink_to(sandbox / "user" / "dir" if what == "checkpoints" else target)
    elif form == "dir_link":
        (run / name).symlink_to(sandbox / "user" / "dir")
    elif form == "dangling":
        (run / name).symlink_to(sandbox / "user" / "nowhere")
    elif form == "fifo":
        os.mkfifo(run / name)
    elif form == "dir":
        (run / name).mkdir()
    elif form == "big":
        (run / name).write_text(json.dumps({"tool": "rcnn_trainer", "pad": "x" * 100_000}))
    elif form == "not_json":
        (run / name).write_bytes(b"\xff\xfe{")
    before = snapshot(sandbox)
    with guarded(writable=(run,)) as guard:
        try:
            claim_folder(run, "rcnn-train", TRAIN_OUTPUTS)
            with RunLock(run):
                pass
            outcome = "ok"
        except UserError:
            outcome = "user_error"
    assert not guard.violations, guard.violations[:3]
    found = changes(before, snapshot(sandbox), skip=["run"])
    assert not found, found[:5]
    return outcome


def train_with_planted_links(sandbox: Path) -> str:
    """Links to the user's files and folders planted where rcnn-train writes (checkpoints/ to a
    folder of theirs, metrics.jsonl, config.yaml, ...) in a run folder of ours: refused before
    anything is written. Then a real tiny training run (2 iterations, a checkpoint each, the final
    evaluation) into a run folder of ours that holds the user's files and links under other names:
    it trains, and they stay as they were. Nothing is written outside the run folder (and the
    synthetic data cache) in either. Returns 'ok' when both hold."""
    from conftest import tiny_dict

    from rcnn_trainer.config_loader import validate_config
    from rcnn_trainer.errors import UserError
    from rcnn_trainer.run_folder import MARKER, _write_marker
    from rcnn_trainer.train.trainer import train

    sandbox.mkdir(parents=True)
    plant_user_files(sandbox)
    user = sandbox / "user"
    cache = Path(os.environ.get("RCNN_TRAINER_CACHE") or sandbox / "cache")
    os.environ.setdefault("RCNN_TRAINER_CACHE", str(cache))
    planted = {"at_outputs": (("metrics.jsonl", user / "notes.txt"), ("config.yaml", user / "config.yaml"),
                              ("checkpoints", user / "dir"), ("model_final.pth", user / "final.pth"),
                              ("eval", user / "dir"), ("probe", user / "dir")),
               "beside": (("data", user / "dir"), ("latest.pth", user / "notes.txt"))}
    outcomes = {}
    for name, links in planted.items():
        run = sandbox / name
        run.mkdir()
        _write_marker(run / MARKER, "rcnn-train")
        for link, target in links:
            (run / link).symlink_to(target)
        (run / "notes.txt").write_text("the user's, beside the run\n")
        cfg = validate_config(tiny_dict(sandbox, output_dir=str(run), solver={"max_iters": 2},
                                        train={"checkpoint_period": 1, "eval_period": 2}), source="hostile_inputs")
        before = snapshot(sandbox)
        with guarded(writable=(run, cache)) as guard:
            try:
                train(cfg, log=lambda _: None, progress=False)
                outcomes[name] = "ok"
            except UserError:
                outcomes[name] = "user_error"
        assert not guard.violations, guard.violations[:5]
        found = changes(before, snapshot(sandbox), skip=[name, os.path.relpath(cache, sandbox)],
                        keep=[f"{name}/notes.txt", *(f"{name}/{link}" for link, _ in links)])
        assert not found, found[:5]
    assert outcomes == {"at_outputs": "user_error", "beside": "ok"}, outcomes
    return "ok"
