"""tools/: metrics plot, torchvision weight conversion; backbone weights from a local file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from conftest import tiny_config, tiny_dict, write_yaml
from rcnn_trainer.engine.trainer import train
from rcnn_trainer.errors import UserError
from rcnn_trainer.model.build import build_model

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_plot_metrics_writes_png(tmp_path):
    train(tiny_config(tmp_path, solver={"max_iters": 4}), log=lambda m: None, progress=False)
    proc = subprocess.run([sys.executable, str(TOOLS / "plot_metrics.py"), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run([sys.executable, str(TOOLS / "plot_metrics.py"), str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "metrics.jsonl" in missing.stderr


def test_convert_torchvision_weights_then_eval(tmp_path):
    torch.manual_seed(0)
    reference = FasterRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3),
                           num_classes=5)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    raw = tiny_dict(tmp_path, model={"backbone": {"norm": "frozen_bn", "fpn_channels": 256},
                                     "roi": {"representation_size": 1024}})
    config = write_yaml(tmp_path / "c.yaml", raw)
    proc = subprocess.run([sys.executable, str(TOOLS / "convert_torchvision_weights.py"), "--config", str(config),
                           "--weights", str(tmp_path / "tv.pth"), "--out", str(tmp_path / "conv.pth")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "rcnn_trainer.cli", "eval", "--config", str(config), "--checkpoint",
                           str(tmp_path / "conv.pth"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "AP50" in proc.stdout
    wrong = write_yaml(tmp_path / "w.yaml", tiny_dict(tmp_path))  # fpn 16: does not fit
    proc = subprocess.run([sys.executable, str(TOOLS / "convert_torchvision_weights.py"), "--config", str(wrong),
                           "--weights", str(tmp_path / "tv.pth"), "--out", str(tmp_path / "x.pth")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "does not fit" in proc.stderr


def test_backbone_weights_from_local_file(tmp_path):
    classifier = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(classifier.layer1[0].conv1.weight, 0.01)
    torch.save(classifier.state_dict(), tmp_path / "r18.pth")
    cfg = tiny_config(tmp_path, model={"backbone": {"weights": str(tmp_path / "r18.pth"), "norm": "frozen_bn",
                                                    "trainable_layers": 2}})
    model = build_model(cfg.model)
    body = model.backbone.body
    assert torch.all(body.layer1[0].conv1.weight == 0.01)
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer4[0].conv1.weight.requires_grad
    (tmp_path / "junk.pth").write_bytes(b"junk")
    bad = tiny_config(tmp_path, model={"backbone": {"weights": str(tmp_path / "junk.pth")}})
    with pytest.raises(UserError, match="not a loadable state dict"):
        build_model(bad.model)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    other = tiny_config(tmp_path, model={"backbone": {"weights": str(tmp_path / "other.pth")}})
    with pytest.raises(UserError, match="does not fit a torchvision resnet18"):
        build_model(other.model)


@pytest.mark.parametrize("name,norm,levels", [("mobilenet_v3_large", "bn", 3), ("resnet34", "bn", 5),
                                             ("resnet18", "gn", 5)])
def test_other_backbones_and_norms_build_and_run(tmp_path, name, norm, levels):
    sizes = [[16], [32], [64], [96], [128]][:levels]
    cfg = tiny_config(tmp_path, model={"backbone": {"name": name, "norm": norm}, "anchors": {"sizes": sizes}})
    model = build_model(cfg.model).train()
    losses, _ = model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 40.0]]),
                                                  "labels": torch.tensor([1])}])
    assert all(torch.isfinite(v) for v in losses.values())


def test_tools_bad_input_exit_2(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", tiny_dict(tmp_path))
    proc = subprocess.run([sys.executable, str(TOOLS / "convert_torchvision_weights.py"), "--config", str(config),
                           "--weights", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x.pth")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "missing.pth" in proc.stderr and "Traceback" not in proc.stderr
    run = tmp_path / "killed"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"type": "train", "iter": 1, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0}\n{"type": "tr')
    proc = subprocess.run([sys.executable, str(TOOLS / "plot_metrics.py"), str(run)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and (run / "metrics.png").is_file(), proc.stderr
    proc = subprocess.run([sys.executable, str(TOOLS / "benchmark.py"), "--config", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_rejects_negative_visualize(tmp_path, capsys):
    from rcnn_trainer.cli import eval_main

    config = write_yaml(tmp_path / "c.yaml", tiny_dict(tmp_path))
    assert eval_main(["--config", str(config), "--checkpoint", "x.pth", "--visualize", "-3"]) == 2
    assert "--visualize" in capsys.readouterr().err


@pytest.mark.parametrize("roi_align", ["auto", "torchvision"])
def test_step_profile_charges_backward_ops_to_their_component(tmp_path, roi_align):
    """tools/step_profile.py: RoIAlign's backward lands on RoIAlign whichever kernel runs it
    (torchvision's op is a custom autograd node, ours a Python Function)."""
    sys.path.insert(0, str(TOOLS))
    import step_profile
    from rcnn_trainer.data.loader import build_dataset, build_train_loader
    from rcnn_trainer.engine.data_settings import resolve_from_data
    from rcnn_trainer.losses.weighting import loss_weights, weighted_total
    from rcnn_trainer.model.build import build_model

    cfg = tiny_config(tmp_path, model={"roi": {"roi_align": roi_align}})
    dataset = build_dataset(cfg, "train")
    cfg = resolve_from_data(cfg, dataset, lambda _: None)
    model = build_model(cfg.model).train()
    weights = loss_weights(cfg.model)

    def step(batch):
        losses, _ = model(*batch)
        weighted_total(losses, weights)[0].backward()

    batches = iter(build_train_loader(cfg, dataset))
    step(next(batches))  # one-time initialisation outside the profile
    ms = step_profile.profile_steps(model, step, batches, steps=2)
    backward = {k: v for k, v in ms.items() if k.endswith(" bwd")}
    assert all(v > 0 for k, v in backward.items() if k.split(" ")[0] in ("RoIAlign", "backbone+FPN", "box", "RPN")), ms
    assert ms["backward outside components"] < 0.2 * sum(backward.values()), ms


def test_bench_dataset_variant_is_deterministic_and_follows_its_spec(tmp_path):
    sys.path.insert(0, str(TOOLS))
    import bench_datasets

    spec = bench_datasets.SPECS["digits_large"]
    first = bench_datasets.ensure("digits_large", tmp_path / "a", num_train=6, num_val=2, seed=3)
    second = bench_datasets.ensure("digits_large", tmp_path / "b", num_train=6, num_val=2, seed=3)
    assert (first / "train.json").read_bytes() == (second / "train.json").read_bytes()
    assert (first / "images" / "train_00004.png").read_bytes() == (second / "images" / "train_00004.png").read_bytes()
    data = json.loads((first / "train.json").read_text())
    assert [c["id"] for c in data["categories"]] == list(range(1, spec.classes + 1))
    assert data["annotations"], "six images of 1-5 objects hold some"
    heights = [a["bbox"][3] for a in data["annotations"]]
    assert spec.heights[0] - 1 <= min(heights) and max(heights) <= spec.heights[1]
    per_image = [sum(a["image_id"] == im["id"] for a in data["annotations"]) for im in data["images"]]
    assert max(per_image) <= spec.max_objects
