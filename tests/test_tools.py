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

from conftest import TORCHVISION_SIZES, tiny_config, tiny_dict, write_yaml
from rcnn_trainer.train.trainer import train
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


def test_convert_torchvision_weights_gives_torchvisions_detections(tmp_path, capsys):
    """A torchvision FasterRCNN state dict (random init, saved here: nothing downloads) converted
    by the tool and loaded as rcnn-eval / rcnn-predict load a checkpoint finds the same boxes,
    scores and labels as torchvision's model with those weights."""
    sys.path.insert(0, str(TOOLS))
    import convert_torchvision_weights
    from rcnn_trainer.cli import eval_main
    from rcnn_trainer.config_loader import load_config
    from rcnn_trainer.runtime.checkpoint import load_checkpoint
    from rcnn_trainer.data.settings import resolve_from_checkpoint
    from rcnn_trainer.infer.run_eval import inference_model

    torch.manual_seed(0)
    reference = FasterRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3),
                           num_classes=5, min_size=64, max_size=64, box_score_thresh=0.0).eval()
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    config = write_yaml(tmp_path / "c.yaml", tiny_dict(tmp_path, model=TORCHVISION_SIZES))
    converted = tmp_path / "conv.pth"
    assert convert_torchvision_weights.main(["--config", str(config), "--weights", str(tmp_path / "tv.pth"),
                                             "--out", str(converted)]) == 0

    ckpt = load_checkpoint(converted)
    cfg = resolve_from_checkpoint(load_config(config), ckpt.get("config", {}))
    model = inference_model(cfg, ckpt, converted, torch.device("cpu"), say=lambda _: None, freeze=True)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    with torch.no_grad():
        expected = reference(images)
        got = model(images, original_sizes=[(64, 64)] * 2)
    for e, g in zip(expected, got):
        assert len(e["boxes"]) > 10 and len(g["boxes"]) == len(e["boxes"])
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-5, rtol=0)
        assert torch.equal(g["labels"], e["labels"])

    assert eval_main(["--config", str(config), "--checkpoint", str(converted), "--no-progress",
                      "--output-dir", str(tmp_path / "eval")]) == 0
    assert "AP50" in capsys.readouterr().out
    wrong = write_yaml(tmp_path / "w.yaml", tiny_dict(tmp_path))  # fpn 16: does not fit
    assert convert_torchvision_weights.main(["--config", str(wrong), "--weights", str(tmp_path / "tv.pth"),
                                             "--out", str(tmp_path / "x.pth")]) == 2
    assert "does not fit" in capsys.readouterr().err and not (tmp_path / "x.pth").exists()


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
    from rcnn_trainer.data.settings import resolve_from_data
    from rcnn_trainer.losses.weighting import weighted_total
    from rcnn_trainer.model.build import build_loss_weights
    from rcnn_trainer.model.build import build_model

    cfg = tiny_config(tmp_path, model={"roi": {"roi_align": roi_align}})
    dataset = build_dataset(cfg, "train")
    cfg = resolve_from_data(cfg, dataset, lambda _: None)
    model = build_model(cfg.model).train()
    weights = build_loss_weights(cfg.model).final()

    def step(batch):
        losses, _ = model(*batch)
        weighted_total(losses, weights)[0].backward()

    batches = iter(build_train_loader(cfg, dataset))
    step(next(batches))  # one-time initialisation outside the profile
    nodes: dict[str, set[str]] = {}
    ms = step_profile.profile_steps(model, step, batches, steps=2, backward_nodes=nodes)
    # the report's rows: each component's forward and backward, then the rest (no timing asserted)
    assert set(ms) == {f"{c} {d}" for c in step_profile.COMPONENTS for d in ("fwd", "bwd")} | {
        "optimizer, transform, loss sum", "backward outside components", "data"}
    kernel = "_SparsePoolBackward" if roi_align == "auto" else "roi_align"  # ours on CPU / torchvision's op
    charged = {component for component, names in nodes.items() if any(kernel in n for n in names)}
    assert charged == {"RoIAlign"}, nodes
    assert {"ConvolutionBackward0", "NativeBatchNormBackward0"} <= nodes["backbone+FPN"]
    assert "ConvolutionBackward0" in nodes["RPN head"] and "AddmmBackward0" in nodes["box head (2 FC + predictor)"]
    assert not any("Convolution" in n or "Addmm" in n for c in ("RoI rest (sampling, matching, loss)", "other", "step")
                   for n in nodes.get(c, ()))  # no layer's gradient charged to the glue
    assert nodes.get("other", set()) <= {"torch::autograd::AccumulateGrad"}  # every op's backward has its component


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
