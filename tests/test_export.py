"""rcnn-export: ONNX (onnxruntime) and TorchScript (torch.jit.load) files against rcnn-predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.ops import box_iou

from conftest import tiny_dict, write_yaml
from rcnn_trainer.cli import export_main, predict_main, train_main
from rcnn_trainer.data.loader import resolve_splits
from rcnn_trainer.config_loader import load_config
from rcnn_trainer.infer.export import run_exported

MASKS = {"mask": {"enabled": True, "num_convs": 1, "conv_channels": 8}}


@pytest.fixture(scope="module", params=["boxes", "masks"])
def trained_model(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"export_{request.param}")
    config = write_yaml(tmp / "c.yaml", tiny_dict(tmp, solver={"max_iters": 8},
                                                  model=MASKS if request.param == "masks" else {}))
    assert train_main(["--config", str(config), "--no-progress"]) == 0
    return config, tmp / "run" / "model_final.pth", request.param == "masks"


def val_images(config, tmp_path, count=3):
    """Validation images at their size (the model's size: no resize) and one mirrored and
    stretched to another size (the exported model resizes it inside)."""
    folder = resolve_splits(load_config(str(config)))["val"][1]
    paths = sorted(folder.glob("*.png"))[:count]
    stretched = tmp_path / "stretched.png"
    with Image.open(paths[0]) as img:
        img.convert("RGB").resize((96, 80), Image.BILINEAR).save(stretched)
    return paths, stretched


def test_exported_model_matches_rcnn_predict(trained_model, tmp_path, capsys):
    """Boxes as TorchScript, masks as ONNX: both exporters and both output signatures."""
    config, checkpoint, masks = trained_model
    fmt = "onnx" if masks else "torchscript"
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"model.{fmt}"
    assert export_main(["--config", str(config), "--checkpoint", str(checkpoint), "--format", fmt,
                        "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "checked on one validation image" in printed and "does NOT match" not in printed
    label_map = json.loads(out.with_name(out.name + ".labels.json").read_text())
    assert set(label_map["labels"]) == {"1", "2", "3", "4"} and label_map["outputs"][:3] == ["boxes", "scores", "labels"]

    paths, stretched = val_images(config, tmp_path)
    assert predict_main(["--config", str(config), "--checkpoint", str(checkpoint), *map(str, paths + [stretched]),
                         "--score-thresh", "0.0", "--no-draw", "--output-dir", str(tmp_path / "pred"),
                         "--no-progress"]) == 0
    predicted = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    cat_of = {int(k): v["category_id"] for k, v in label_map["labels"].items()}
    compared = 0
    for path in paths + [stretched]:
        with Image.open(path) as img:
            image = TF.pil_to_tensor(img.convert("RGB")).float().div(255.0)[None]
        outputs = run_exported(out, fmt, image)
        assert len(outputs) == (4 if masks else 3)
        boxes, scores, labels = outputs[0], outputs[1], outputs[2]
        if masks:
            assert outputs[3].shape[1:] == (1, *image.shape[-2:])
        mine = [p for p in predicted if p["file_name"] == str(path)]
        theirs = torch.tensor([p["bbox"] for p in mine]).reshape(-1, 4)
        theirs[:, 2:] += theirs[:, :2]
        if path == stretched:
            # resized by PIL in rcnn-predict, by torch inside the exported model: confident
            # detections must agree (the criterion), the faint ones may differ
            keep = scores >= 0.5
            boxes, labels = boxes[keep], labels[keep]
            theirs_conf = [i for i, p in enumerate(mine) if p["score"] >= 0.5]
            theirs, mine = theirs[theirs_conf], [mine[i] for i in theirs_conf]
        else:
            assert np.allclose(sorted(scores.tolist()), sorted(p["score"] for p in mine), atol=1e-3)
        assert len(boxes) == len(mine)
        if len(boxes):  # each exported detection has a predicted one of its class at IoU >= 0.95
            iou = box_iou(boxes.float(), theirs)
            same_class = torch.tensor([[cat_of[int(l)] == p["category_id"] for p in mine] for l in labels])
            assert bool(((iou * same_class).max(1).values >= 0.95).all())
        compared += len(boxes)
    assert compared > 0  # the test compared detections, not empty lists


def test_unknown_format_and_unwritable_output_are_clear(trained, tmp_path, capsys):
    config, checkpoint = trained
    with pytest.raises(SystemExit) as stopped:  # argparse's usage error
        export_main(["--config", str(config), "--checkpoint", str(checkpoint), "--format", "tflite",
                     "--output", str(tmp_path / "m")])
    assert stopped.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = export_main(["--config", str(config), "--checkpoint", str(checkpoint), "--format", "torchscript",
                        "--output", str(blocker / "m.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and str(blocker) in err
