"""Issue 37: a user's files are never overwritten, hostile inputs end in exit 2 naming the file,
a planted file in the torch cache runs nothing, a killed run's children never hold its lock."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from rcnn_trainer.cli import export_main, train_main
from rcnn_trainer.config_loader import load_config
from rcnn_trainer.train.run_lock import RunLock
from rcnn_trainer.errors import UserError
from rcnn_trainer.run_folder import MARKER, claim_folder, owned_by_us

from conftest import tiny_dict, write_yaml

REPO_CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 1. the run folder belongs to the run
def test_a_users_config_in_the_output_dir_is_never_overwritten(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    project.mkdir()
    user_config = project / "config.yaml"
    user_config.write_text(f"# my experiment\n_base_: {REPO_CONFIG}\nsolver:\n  max_iters: 1  # short\n")
    (project / "notes.txt").write_text("mine")
    before = snapshot(project)
    monkeypatch.chdir(project)
    assert train_main(["--config", "config.yaml", "--output-dir", ".", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'config.yaml'" in err and "did not create" in err and "--output-dir" in err
    assert snapshot(project) == before  # nothing changed, nothing added (no marker, no .lock)


def test_claim_folder_rules(tmp_path):
    new = tmp_path / "new"
    assert claim_folder(new, "rcnn-train", ["config.yaml"]) is False and owned_by_us(new)
    assert claim_folder(new, "rcnn-train", ["config.yaml"]) is True  # ours: written again
    users = tmp_path / "users"
    users.mkdir()
    (users / "data.csv").write_text("x")  # unrelated files: the run may sit beside them
    claim_folder(users, "rcnn-train", ["config.yaml"])
    assert (users / "data.csv").read_text() == "x" and owned_by_us(users)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / MARKER).write_text('{"tool": "something else"}')
    with pytest.raises(UserError, match=MARKER):
        claim_folder(foreign, "rcnn-train", ["config.yaml"])
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "metrics.jsonl").symlink_to(tmp_path / "users" / "data.csv")
    with pytest.raises(UserError, match="metrics.jsonl"):
        claim_folder(linked, "rcnn-train", ["metrics.jsonl"])
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        claim_folder(a_file, "rcnn-eval", [])


def test_rerun_into_an_owned_folder_without_checkpoints_starts_its_log_over(tmp_path):
    raw = tiny_dict(tmp_path, solver={"max_iters": 2}, train={"checkpoint_period": 1000, "eval_period": 0})
    config = write_yaml(tmp_path / "c.yaml", raw)
    run = tmp_path / "run"
    assert train_main(["--config", str(config), "--no-progress"]) == 0
    import shutil
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # as a run killed before any checkpoint leaves it
    (run / "model_final.pth").unlink()
    (run / "model_best.pth").unlink(missing_ok=True)
    lines_before = (run / "metrics.jsonl").read_text().splitlines()
    assert train_main(["--config", str(config), "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == len(lines_before)  # not appended twice
    assert sum(r.get("type") == "summary" for r in records) == 1
    # and its final weights are never replaced by a new run
    assert train_main(["--config", str(config), "--no-progress"]) == 2


# ------------------------------------------------------------------ 2. depth and size limits
def test_deep_yaml_alias_bomb_and_base_diamond_are_refused_fast(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text(f"_base_: {REPO_CONFIG}\nseed: " + "[" * 3000 + "]" * 3000 + "\n")
    laughs = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"_base_: {REPO_CONFIG}\nlaughs: {{{', '.join(laughs)}}}\n")
    for i in range(30):  # each level includes the next twice: 2^30 reads without memoization
        nxt = f"d{i + 1}.yaml"
        (tmp_path / f"d{i}.yaml").write_text(f"_base_: [{nxt}, {nxt}]\nseed: {i}\n" if i < 29 else f"_base_: {REPO_CONFIG}\n")
    shallow = tmp_path / "s0.yaml"  # a diamond within the depth limit loads, once per file
    for i in range(10):
        nxt = f"s{i + 1}.yaml"
        (tmp_path / f"s{i}.yaml").write_text(f"_base_: [{nxt}, {nxt}]\nseed: {i}\n" if i < 9 else f"_base_: {REPO_CONFIG}\n")
    script = ("import sys\nfrom rcnn_trainer.config_loader import load_config\nfrom rcnn_trainer.errors import UserError\n"
              "for path in sys.argv[1:]:\n    try:\n        print('loaded', load_config(path).seed)\n"
              "    except UserError as err:\n        print('refused', str(err)[:300])\n")
    out = subprocess.run([sys.executable, "-c", script, str(deep), str(bomb), str(tmp_path / "d0.yaml"), str(shallow)],
                         capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert out[0].startswith("refused") and "deep.yaml" in out[0] and "nested too deeply" in out[0]
    assert out[1].startswith("refused") and "bomb.yaml" in out[1] and "values" in out[1]
    assert out[2].startswith("refused") and "_base_ chain deeper" in out[2]
    assert out[3] == "loaded 0"


def test_deep_override_and_oversized_config_are_refused(tmp_path):
    with pytest.raises(UserError, match="override 'seed'.*nest"):
        load_config(REPO_CONFIG, ["seed=" + "[" * 40 + "]" * 40])
    big = tmp_path / "big.yaml"
    big.write_text("seed: 1\n" + "# padding\n" * 120_000)
    with pytest.raises(UserError, match="big.yaml.*MiB"):
        load_config(big)


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_annotation_file_is_exit_2_naming_it(tmp_path, capsys, depth):
    from conftest import ann, image, write_coco

    ann_file = write_coco(tmp_path / "d", [image(1)], [ann(1, 1, 7, [2, 2, 10, 10])])
    data = json.loads(ann_file.read_text())
    data["info"] = "@@"
    ann_file.write_text(json.dumps(data).replace('"@@"', "[" * depth + "]" * depth))
    split = {"ann_file": str(ann_file), "img_dir": str(tmp_path / "d")}
    raw = tiny_dict(tmp_path, data={"train": split, "val": split})
    raw["data"].pop("synthetic")
    assert train_main(["--config", str(write_yaml(tmp_path / "c.yaml", raw)), "--preflight"]) == 2
    err = capsys.readouterr().err
    assert str(ann_file) in err and ("deeper than" in err or "too deeply" in err)


def test_annotation_file_size_limit_names_the_key(tmp_path, capsys):
    from conftest import ann, image, write_coco

    ann_file = write_coco(tmp_path / "d", [image(1)], [ann(1, 1, 7, [2, 2, 10, 10])])
    split = {"ann_file": str(ann_file), "img_dir": str(tmp_path / "d")}
    raw = tiny_dict(tmp_path, data={"train": split, "val": split, "max_annotation_mb": 0.0001})
    raw["data"].pop("synthetic")
    assert train_main(["--config", str(write_yaml(tmp_path / "c.yaml", raw)), "--preflight"]) == 2
    err = capsys.readouterr().err
    assert str(ann_file) in err and "data.max_annotation_mb" in err


# ------------------------------------------------------------------ 4. ImageNet weights are data, hash-checked
PAYLOAD = """
import os, pickle, sys
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
import torch
torch.save({"conv1.weight": Payload()}, sys.argv[1])
"""


def test_planted_imagenet_file_in_the_hub_cache_runs_nothing(tmp_path, monkeypatch):
    from rcnn_trainer.model.backbone import build_backbone

    torch_home = tmp_path / "torch_home"
    planted = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    planted.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    subprocess.run([sys.executable, "-c", PAYLOAD, str(planted), str(marker)], check=True)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    with pytest.raises(UserError, match="does not match the hash"):
        build_backbone("resnet18", weights="imagenet", trainable_layers=3, norm="frozen_bn", fpn_channels=16)
    assert not marker.exists()


def test_imagenet_weights_load_from_a_hash_checked_cache(tmp_path, monkeypatch):
    """The weights path works offline: a state dict in the hub cache under torchvision's file name
    scheme (<arch>-<sha256 prefix>.pth) is loaded into the backbone."""
    from rcnn_trainer.model import imagenet_weights
    from rcnn_trainer.model.backbone import build_backbone

    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    staged = tmp_path / "staged.pth"
    torch.save(reference.state_dict(), staged)
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    os.replace(staged, cache / f"resnet18-{digest[:8]}.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(imagenet_weights, "published_url",
                        lambda name: f"https://download.pytorch.org/models/resnet18-{digest[:8]}.pth")
    backbone = build_backbone("resnet18", weights="imagenet", trainable_layers=3, norm="frozen_bn", fpn_channels=16)
    assert torch.equal(backbone.body.conv1.weight, reference.conv1.weight)
    assert torch.equal(backbone.body.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


# ------------------------------------------------------------------ 6. a killed run's children never hold its lock
HOLD_WITH_CHILD = """
import multiprocessing as mp, sys, time
from rcnn_trainer.train.run_lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
child = mp.get_context("fork").Process(target=time.sleep, args=(60,), daemon=False)
child.start()  # as a DataLoader worker: forked while the lock is held, it inherits the descriptor
print(child.pid, flush=True)
time.sleep(60)
"""


def test_lock_is_free_right_after_sigkill_while_forked_children_live(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WITH_CHILD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    child_pid = int(holder.stdout.readline())
    try:
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            RunLock(run_dir).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child_pid, 0)  # the orphaned child is still alive ...
        with RunLock(run_dir):  # ... and does not hold the lock
            pass
    finally:
        os.kill(child_pid, signal.SIGKILL)


def test_lock_refuses_a_second_holder_in_the_same_process_and_a_symlink(tmp_path):
    with RunLock(tmp_path / "a"):
        with pytest.raises(UserError, match="in use"):
            RunLock(tmp_path / "a").acquire()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / ".lock").symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        RunLock(tmp_path / "b").acquire()
    assert victim.read_text() == "precious"


# ------------------------------------------------------------------ 7. smaller ones
def test_export_never_replaces_a_file_without_overwrite(trained, tmp_path, capsys):
    config, checkpoint = trained
    out = tmp_path / "model.pt"
    out.write_text("the user's file")
    args = ["--config", str(config), "--checkpoint", str(checkpoint), "--format", "torchscript", "--output", str(out)]
    assert export_main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "the user's file"
    assert export_main(args + ["--overwrite"]) == 0
    assert out.stat().st_size > 1000 and (tmp_path / "model.pt.labels.json").is_file()


def test_lr_find_takes_the_run_folder_lock(trained, tmp_path, capsys):
    config, _ = trained
    run_dir = tmp_path / "busy"
    claim_folder(run_dir, "rcnn-train", ())
    with RunLock(run_dir):
        assert train_main(["--config", str(config), "--lr-find", "--lr-find-iters", "3", "--output-dir", str(run_dir),
                           "--no-progress"]) == 2
    assert "in use" in capsys.readouterr().err and not (run_dir / "lr_find.json").exists()


def test_expected_initial_rpn_focal_loss_follows_gamma():
    import math

    from rcnn_trainer.losses.settings import ClsLoss
    from rcnn_trainer.model import stats as S
    from rcnn_trainer.monitor import checks

    record = {S.IMAGES: 1, S.RPN_POS: 10, S.RPN_NEG: 30, S.RPN_CLS_FACTOR: 10, S.ROI_POS: 4, S.ROI_NEG: 12,
              S.ROI_CLS_FACTOR: 16}
    for gamma in (0.0, 2.0):
        rpn = ClsLoss(type="focal", gamma=gamma, alpha=0.25)
        got = checks.expected_initial_losses(record, num_classes=3, rpn_cls=rpn, roi_cls=ClsLoss(type="ce"))
        # sigmoid focal loss at zero logits, computed by torchvision
        from torchvision.ops import sigmoid_focal_loss
        targets = torch.cat([torch.ones(10), torch.zeros(30)])
        want = sigmoid_focal_loss(torch.zeros(40), targets, alpha=0.25, gamma=gamma, reduction="sum") / 10
        assert math.isclose(got["loss_rpn_cls"], float(want), rel_tol=1e-5)


def test_preflight_thresholds_are_config_keys(tmp_path):
    from rcnn_trainer.monitor.preflight import run_preflight
    from conftest import ann, image, write_coco
    from rcnn_trainer.data.coco import CocoDetection
    from rcnn_trainer.config_monitor import PreflightLimits

    anns = [ann(i, 1 + i % 4, 7, [1, 1, 20, 20]) for i in range(1, 60)] + [ann(99, 1, 3, [1, 1, 20, 20])]
    ds = CocoDetection(write_coco(tmp_path, [image(i) for i in range(1, 5)], anns), tmp_path)
    settings = dict(anchor_sizes=[[8], [16], [32], [64], [128]], aspect_ratios=[0.5, 1.0, 2.0],
                    strides=[4, 8, 16, 32, 64], min_size=64, max_size=64, fg_iou_thresh=0.7)
    names = lambda report: {f.alarm.name for f in report.findings}  # noqa: E731
    assert "class_imbalance" in names(run_preflight(ds, "train", **settings))
    assert "class_imbalance" not in names(run_preflight(ds, "train", limits=PreflightLimits(imbalance=100), **settings))
    cfg = load_config(REPO_CONFIG, ["monitor.preflight.imbalance=100"])
    assert cfg.monitor.preflight.imbalance == 100
