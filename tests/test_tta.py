"""--tta: passes mirrored back to original coordinates, merged per class, wired into eval and predict."""

from __future__ import annotations

import json

import torch
from torch import nn

from rcnn_trainer.cli import eval_main, predict_main
from rcnn_trainer.engine.tta import TTAModel


class OneBoxModel(nn.Module):
    """Finds one box where the image's bright column is, whatever the scale (in original pixels)."""

    def forward(self, images, original_sizes=None, masks=True):
        out = []
        for image, (height, width) in zip(images, original_sizes):
            column = (int(image[0].sum(0).argmax()) + 0.5) * width / image.shape[-1]  # the pixel's centre
            out.append({"boxes": torch.tensor([[column - 2, 5.0, column + 2, 15.0]]),
                        "scores": torch.tensor([0.9 if image.shape[-1] == width else 0.8]),
                        "labels": torch.tensor([1]),
                        "masks": torch.zeros(1, 1, height, width)})
        return out


def test_flipped_passes_come_back_mirrored_and_scales_merge_by_class():
    image = torch.zeros(3, 32, 64)
    image[:, :, 10] = 1.0  # the object near the left edge
    tta = TTAModel(OneBoxModel(), scales=[0.5, 1.0], flip=True, nms_thresh=0.5, max_detections=10)
    (merged,) = tta([image], original_sizes=[(32, 64)])
    # four passes, the two unflipped scales and the two flipped ones agree: one box each, the
    # 1.0 pass's higher score kept; mirrored back, the flipped passes find the same column
    assert len(merged["boxes"]) == 1
    assert abs(float(merged["scores"][0]) - 0.9) < 1e-6
    assert abs(float(merged["boxes"][0, 0]) - 8.5) <= 0.5 and merged["masks"].shape == (1, 1, 32, 64)
    plain = TTAModel(OneBoxModel(), scales=[1.0], flip=False, nms_thresh=0.5, max_detections=10)
    assert len(plain.passes()) == 1 and len(tta.passes()) == 4


def test_eval_and_predict_run_with_tta(trained, tmp_path, capsys):
    config, checkpoint = trained
    out = tmp_path / "eval"
    assert eval_main(["--config", str(config), "--checkpoint", str(checkpoint), "--tta", "--no-progress",
                      "--output-dir", str(out), "tta.min_sizes=[48]", "tta.flip=true"]) == 0
    printed = capsys.readouterr().out
    assert "[tta] 4 passes" in printed and "each also mirrored" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tta"] is True and -1.0 <= metrics["AP50"] <= 1.0
    image = _an_image(tmp_path)
    assert predict_main(["--config", str(config), "--checkpoint", str(checkpoint), str(image), "--tta",
                         "--score-thresh", "0", "--output-dir", str(tmp_path / "pred"), "--no-progress"]) == 0
    assert isinstance(json.loads((tmp_path / "pred" / "predictions.json").read_text()), list)


def _an_image(tmp_path):
    from PIL import Image

    path = tmp_path / "im.png"
    Image.new("RGB", (64, 48), (120, 90, 60)).save(path)
    return path
