"""Engine end to end on tiny synthetic data: CLI train + eval, resume, kill, non-finite, AMP, clipping."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import crashed_then_resumed, tiny_config, tiny_dict, write_yaml
from rcnn_trainer.cli import eval_main, train_main
from rcnn_trainer.config_loader import load_config
from rcnn_trainer.runtime import checkpoint as ckpt_io
from rcnn_trainer.train.metrics_log import MetricsLog
from rcnn_trainer.train.trainer import train
from rcnn_trainer.errors import TrainingStopped, UserError
from rcnn_trainer.model.build import build_model

quiet = lambda _msg: None


def test_cli_train_then_eval(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", tiny_dict(tmp_path))
    assert train_main(["--config", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file() and (run / "model_final.pth").is_file()
    lines = MetricsLog(run / "metrics.jsonl").read()
    train_lines = [l for l in lines if l["type"] == "train"]
    assert [l["iter"] for l in train_lines] == [1, 2, 3, 4]
    for key in ("loss", "loss_rpn_cls", "loss_rpn_box", "loss_roi_cls", "loss_roi_box", "lr",
                "loss_roi_cls_weighted", "avg_factor/rpn_cls", "avg_factor/roi_box", "grad_norm"):
        assert key in train_lines[0], key
    evals = [l for l in lines if l["type"] == "eval"]
    assert evals and all(k in evals[-1] for k in ("AP", "AP50", "AP75"))
    assert any(l["type"] == "monitor" and "dets@0.05" in l for l in lines)
    out = capsys.readouterr()
    assert "monitor @ iter 4/4" in out.out + out.err  # the last judgment always prints the dashboard

    code = eval_main(["--config", str(config), "--checkpoint", str(run / "model_final.pth"), "--visualize", "2",
                      "--no-progress"])
    assert code == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "AR100", "per_class_AP", "threshold_counts"} <= metrics.keys()
    assert len(list((run / "eval" / "vis").glob("*.png"))) == 2
    results = json.loads((run / "eval" / "coco_results.json").read_text())
    assert all(r["category_id"] in (1, 2, 3, 4) for r in results)


def test_rerun_into_used_output_dir_refused(tmp_path):
    cfg = tiny_config(tmp_path, solver={"max_iters": 2})
    train(cfg, log=quiet, progress=False)
    with pytest.raises(UserError, match="already holds results of an earlier run .ckpt_"):
        train(cfg, log=quiet, progress=False)


def test_eval_with_other_config_is_clear(tmp_path, capsys):
    cfg_path = write_yaml(tmp_path / "c.yaml", tiny_dict(tmp_path, solver={"max_iters": 2}))
    assert train_main(["--config", str(cfg_path), "--no-progress"]) == 0
    other = write_yaml(tmp_path / "o.yaml", tiny_dict(tmp_path, model={"backbone": {"fpn_channels": 8}}))
    code = eval_main(["--config", str(other), "--checkpoint", str(tmp_path / "run" / "model_final.pth")])
    err = capsys.readouterr().err
    assert code == 2 and "different model" in err and "fpn_channels" in err and "Traceback" not in err


def test_resume_is_exact(tmp_path, after_forward):
    """Interrupted at iteration 5 (last checkpoint at 3) and resumed == never interrupted."""
    settings = dict(solver={"max_iters": 6}, train={"checkpoint_period": 3})
    train(tiny_config(tmp_path / "a", **settings), log=quiet, progress=False)
    crashed_then_resumed(tmp_path / "b", after_forward, **settings)

    a = torch.load(tmp_path / "a" / "run" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "run" / "model_final.pth", weights_only=True)["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    strip = lambda lines: [{k: v for k, v in l.items() if "time" not in k}
                           for l in lines]
    log_a = strip(MetricsLog(tmp_path / "a" / "run" / "metrics.jsonl").read())
    log_b = strip(MetricsLog(tmp_path / "b" / "run" / "metrics.jsonl").read())
    assert len(log_a) > 6 and log_a == log_b


def test_resume_refuses_model_change(tmp_path):
    train(tiny_config(tmp_path, solver={"max_iters": 2}), log=quiet, progress=False)
    changed = tiny_config(tmp_path, solver={"max_iters": 4}, model={"roi": {"representation_size": 16}})
    with pytest.raises(UserError, match="resume refused.*representation_size"):
        train(changed, resume=True, log=quiet, progress=False)


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    cfg = tiny_config(tmp_path, solver={"max_iters": 4}, train={"checkpoint_period": 2})
    train(cfg, log=quiet, progress=False)
    ckpts = ckpt_io.periodic_checkpoints(tmp_path / "run" / "checkpoints")
    newest = ckpts[0]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    with pytest.raises(UserError, match="corrupt or truncated"):
        ckpt_io.load_checkpoint(newest)
    messages = []
    more = tiny_config(tmp_path, solver={"max_iters": 6}, train={"checkpoint_period": 2})
    train(more, resume=True, log=messages.append, progress=False)
    assert any("Falling back" in m for m in messages)
    assert any("continuing from" in m and "ckpt_0000002" in m for m in messages)


# rcnn-train in a process whose fsync of one named temporary SIGKILLs it: the checkpoint's bytes
# are written, not yet fsynced nor renamed
TRAIN_KILLED_AT_FSYNC_OF = """
import os, sys
real_fsync = os.fsync
def fsync(fd):
    if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(sys.argv[1]):
        os.kill(os.getpid(), 9)
    real_fsync(fd)
os.fsync = fsync
from rcnn_trainer.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_during_checkpoint_write_leaves_loadable_newest(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", tiny_dict(tmp_path, solver={"max_iters": 6}, train={"checkpoint_period": 2}))
    proc = subprocess.run([sys.executable, "-c", TRAIN_KILLED_AT_FSYNC_OF, ".ckpt_0000004.pth.", "train",
                           "--config", str(config), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    folder = tmp_path / "run" / "checkpoints"
    newest = ckpt_io.periodic_checkpoints(folder)[0]
    assert newest.name == "ckpt_0000002.pth"
    assert ckpt_io.load_checkpoint(newest)["iteration"] == 2
    assert list(folder.glob(".ckpt_0000004.pth.*.tmp"))  # the half-written file never took the name
    proc = subprocess.run([sys.executable, "-m", "rcnn_trainer.cli", "train", "--config", str(config), "--resume",
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ckpt_io.load_checkpoint(tmp_path / "run" / "model_final.pth")["iteration"] == 6


def test_nonfinite_loss_skips_counts_and_stops(tmp_path, after_forward):
    def inject(it, losses):
        if it >= 2:
            losses["loss_roi_box"] = losses["loss_roi_box"] * float("nan")
    cfg = tiny_config(tmp_path, solver={"max_iters": 10, "max_nonfinite_steps": 3}, train={"checkpoint_period": 2})
    with pytest.raises(TrainingStopped, match="3 non-finite steps in a row.*first term to go non-finite was loss_roi_box"):
        after_forward(inject)
        train(cfg, log=quiet, progress=False)
    lines = MetricsLog(tmp_path / "run" / "metrics.jsonl").read()
    assert [l["iter"] for l in lines if l["type"] == "nonfinite"] == [3, 4, 5]
    newest = ckpt_io.periodic_checkpoints(tmp_path / "run" / "checkpoints")[0]
    assert ckpt_io.load_checkpoint(newest)["iteration"] == 2  # the last good one, intact


def test_single_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, after_forward):
    def inject(it, losses):
        if it == 1:
            losses["loss_rpn_cls"] = losses["loss_rpn_cls"] * float("inf")
    cfg = tiny_config(tmp_path, solver={"max_iters": 3})
    after_forward(inject)
    train(cfg, log=quiet, progress=False)
    lines = MetricsLog(tmp_path / "run" / "metrics.jsonl").read()
    assert [l["terms"] for l in lines if l["type"] == "nonfinite"] == [["loss_rpn_cls"]]
    assert lines[-1]["type"] == "summary" and lines[-1]["nonfinite_steps"] == 1


def test_bf16_autocast_with_channels_last_on_cpu_runs(tmp_path):
    cfg = tiny_config(tmp_path, solver={"max_iters": 2, "amp": True, "amp_dtype": "bfloat16"})
    messages = []
    metrics = train(cfg, log=messages.append, progress=False)
    assert "AP" in metrics and any("AMP: torch.bfloat16 autocast on cpu" in m for m in messages)
    lines = [l for l in MetricsLog(tmp_path / "run" / "metrics.jsonl").read() if l["type"] == "train"]
    assert all(isinstance(l["loss"], float) and math.isfinite(l["loss"]) for l in lines)


def test_amp_auto_on_cpu_follows_the_hardware(tmp_path, monkeypatch):
    """auto: bf16 only on a CPU with AMX/AVX512-BF16; elsewhere fp32, saying why."""
    from rcnn_trainer.runtime import device as device_module
    for has_bf16, expected in ((False, "AMP: fp32. This CPU has neither AMX nor AVX512-BF16"),
                               (True, "AMP: torch.bfloat16 autocast on cpu")):
        monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda: has_bf16)
        cfg = tiny_config(tmp_path / str(has_bf16), solver={"max_iters": 1, "amp": True})
        messages = []
        train(cfg, log=messages.append, progress=False)
        assert any(expected in m for m in messages)


def test_autocast_heads_hand_fp32_to_decoding_and_losses():
    """Under bf16 autocast the RPN and box predictor answer in bf16; proposals, losses and
    detections must still come out in fp32 (bf16 has 8 mantissa bits: 2 px steps at 256-512 px)."""
    cfg = load_config("config.yaml", ["model.num_classes=3", "model.anchors.sizes=[[16],[32],[64],[128],[256]]",
                             "model.backbone.fpn_channels=16", "model.roi.representation_size=32",
                             "model.roi.batch_size_per_image=64"])
    model = build_model(cfg.model).use_channels_last()
    images = [torch.rand(3, 96, 128), torch.rand(3, 96, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])}] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, _ = model(images, targets)
        model.eval()
        detections = model(images)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert all(d["boxes"].dtype == torch.float32 for d in detections)


def test_clipping_engages_above_the_bound(tmp_path):
    cfg = tiny_config(tmp_path, solver={"max_iters": 3, "clip_grad_norm": 1e-3})
    train(cfg, log=quiet, progress=False)
    lines = [l for l in MetricsLog(tmp_path / "run" / "metrics.jsonl").read() if l["type"] == "train"]
    assert all(l["clipped"] and l["grad_norm"] > 1e-3 for l in lines)
    loose = tiny_config(tmp_path / "loose", solver={"max_iters": 3, "clip_grad_norm": 1e6})
    train(loose, log=quiet, progress=False)
    lines = [l for l in MetricsLog(tmp_path / "loose" / "run" / "metrics.jsonl").read() if l["type"] == "train"]
    assert not any(l["clipped"] for l in lines)


def test_max_epochs_sets_iterations(tmp_path):
    messages = []
    cfg = tiny_config(tmp_path, solver={"max_epochs": 2, "max_iters": 999})  # 12 images, batch 2 -> 6 per epoch
    train(cfg, log=messages.append, progress=False)
    lines = [l for l in MetricsLog(tmp_path / "run" / "metrics.jsonl").read() if l["type"] == "train"]
    assert lines[-1]["iter"] == 12 and any("6 iterations per epoch, max_iters=12" in m for m in messages)
    bad = tiny_config(tmp_path / "b", solver={"max_epochs": 1, "max_iters": 999, "steps": [50]})
    with pytest.raises(UserError, match="solver.steps"):
        train(bad, log=quiet, progress=False)


def test_fp16_grad_scaler_overflow_steps_are_not_nonfinite(tmp_path, monkeypatch):
    """fp16 autocast + GradScaler on CPU, the CUDA AMP path: a scaler that starts far too high
    overflows for many steps in a row while it finds its scale. Those steps are skipped by the
    scaler and logged as amp_overflow; they never count as non-finite nor stop the run."""
    import rcnn_trainer.train.run_setup as trainer_module

    monkeypatch.setattr(trainer_module, "grad_scaler_for",
                        lambda device, enabled, setting: torch.amp.GradScaler(device.type, init_scale=2.0 ** 28))
    cfg = tiny_config(tmp_path, solver={"amp": True, "amp_dtype": "float16", "max_iters": 24, "max_nonfinite_steps": 3},
                      train={"checkpoint_period": 100})
    messages = []
    train(cfg, log=messages.append, progress=False)
    lines = MetricsLog(tmp_path / "run" / "metrics.jsonl").read()
    overflows = [l for l in lines if l["type"] == "amp_overflow"]
    assert len(overflows) >= 4  # more in a row than max_nonfinite_steps
    assert [l["scale"] for l in overflows] == sorted((l["scale"] for l in overflows), reverse=True)
    assert not [l for l in lines if l["type"] == "nonfinite"]
    summary = lines[-1]
    assert summary["type"] == "summary" and summary["amp_overflow_steps"] == len(overflows)
    assert summary["nonfinite_steps"] == 0
    assert not any(a["name"] == "gradients" for a in lines if a["type"] == "alarm")
    assert any("AMP: torch.float16 autocast on cpu with a GradScaler" in m for m in messages)
    assert sum(1 for l in lines if l["type"] == "train" and not l.get("amp_overflow")) >= 1  # real steps happened


def test_optimizer_is_fused_unless_a_grad_scaler_runs(tmp_path):
    """The fused update (one kernel for all tensors) is what the trainer builds; with a
    GradScaler (fp16) it builds the per-tensor one (the fused CPU kernel corrupted its moments
    on skipped steps), and both give the same update on a normal step."""
    from rcnn_trainer.runtime.distributed import DistInfo
    from rcnn_trainer.train.run_setup import build_training_parts

    cpu, info = torch.device("cpu"), DistInfo()
    plain = build_training_parts(tiny_config(tmp_path), info, cpu, quiet)
    scaled = build_training_parts(tiny_config(tmp_path, solver={"amp": True, "amp_dtype": "float16"}), info, cpu, quiet)
    assert not plain["scaler"].is_enabled() and plain["optimizer"].defaults["fused"]
    assert scaled["scaler"].is_enabled() and not scaled["optimizer"].defaults["fused"]
    models = [plain["model"], scaled["model"]]
    models[1].load_state_dict(models[0].state_dict())
    for model, optimizer in zip(models, (plain["optimizer"], scaled["optimizer"])):
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)
        optimizer.step()
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.allclose(a, b, atol=1e-6)


def test_syncbn_converts_every_batchnorm_under_ddp_only(tmp_path):
    from rcnn_trainer.runtime.distributed import DistInfo
    from rcnn_trainer.train.run_setup import build_training_parts

    cfg = tiny_config(tmp_path, model={"backbone": {"norm": "syncbn"}})
    kinds = lambda model: {type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    ddp = build_training_parts(cfg, DistInfo(rank=0, world_size=2), torch.device("cpu"), quiet)["model"]
    assert kinds(ddp) == {torch.nn.SyncBatchNorm}
    single = build_training_parts(cfg, DistInfo(), torch.device("cpu"), quiet)["model"]
    assert torch.nn.SyncBatchNorm not in kinds(single) and kinds(single)  # one process: plain BatchNorm




def test_resume_of_a_finished_run_leaves_the_same_metrics(tmp_path):
    """A kill that lands after the last checkpoint (during or after the final evaluation), then
    --resume: the final evaluation runs again and the log equals the uninterrupted one, instead of
    holding a second eval and summary line (the kill tool found this in 7 of 20 rounds)."""
    cfg = tiny_config(tmp_path, solver={"max_iters": 4}, train={"checkpoint_period": 2})
    train(cfg, log=quiet, progress=False)
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    strip = lambda lines: [{k: v for k, v in l.items() if "time" not in k} for l in lines]
    before = strip(log.read())
    train(cfg, resume=True, log=quiet, progress=False)
    assert strip(log.read()) == before
    assert [l["type"] for l in before].count("summary") == 1
