"""--tta: passes mirrored back to original coordinates, merged per class, wired into eval and predict."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from rcnn_trainer.cli import eval_main, predict_main
from rcnn_trainer.config_loader import load_config
from rcnn_trainer.runtime.checkpoint import load_checkpoint
from rcnn_trainer.infer.tta import TTAModel
from rcnn_trainer.model.build import build_model


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


def _trained_model(config, checkpoint):
    cfg = load_config(config)
    model = build_model(cfg.model).eval()
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return cfg, model


def _mirrored(det: dict, width: int) -> dict:
    boxes = det["boxes"].clone()
    boxes[:, [0, 2]] = width - det["boxes"][:, [2, 0]]
    return dict(det, boxes=boxes)


def _as_set(det: dict) -> set:
    return {(label, round(score, 4), *(round(v, 3) for v in box))
            for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())}


def _by_hand(model, image, scales, flip, nms_thresh, max_detections):
    """What TTA must give, built without it: the model on each resized (and explicitly mirrored)
    image, the mirrored passes' boxes mirrored back by hand, all pooled and NMS-ed per class."""
    height, width = image.shape[-2:]
    pooled = []
    for scale in scales:
        resized = image if scale == 1.0 else F.interpolate(
            image[None], scale_factor=scale, mode="bilinear", align_corners=False, antialias=scale < 1.0,
            recompute_scale_factor=False)[0]
        pooled.append(model([resized], original_sizes=[(height, width)])[0])
        if flip:
            pooled.append(_mirrored(model([resized.flip(-1)], original_sizes=[(height, width)])[0], width))
    merged = {k: torch.cat([d[k] for d in pooled]) for k in ("boxes", "scores", "labels")}
    keep = batched_nms(merged["boxes"], merged["scores"], merged["labels"], nms_thresh)[:max_detections]
    return {k: v[keep] for k, v in merged.items()}, pooled


@torch.no_grad()
def test_tta_on_the_trained_model_is_its_passes_merged(trained):
    cfg, model = _trained_model(*trained)
    nms, top = cfg.model.roi.nms_thresh, cfg.model.roi.detections_per_img
    image = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))  # not left-right symmetric
    plain = model([image], original_sizes=[(48, 64)])[0]
    assert len(plain["boxes"]) > 10

    # one pass at the evaluation size, unflipped: exactly the model's own detections
    (identity,) = TTAModel(model, [1.0], False, nms, top)([image], original_sizes=[(48, 64)])
    assert _as_set(identity) == _as_set(plain)
    torch.testing.assert_close(identity["scores"], plain["scores"])

    for scales in ([1.0], [0.5, 1.0]):
        (merged,) = TTAModel(model, scales, True, nms, top)([image], original_sizes=[(48, 64)])
        expected, pooled = _by_hand(model, image, scales, True, nms, top)
        assert _as_set(merged) == _as_set(expected), scales
        from_mirrored = _as_set(merged) & set().union(*(_as_set(d) for d in pooled[1::2]))
        assert from_mirrored - _as_set(plain), scales  # some kept detections come from mirrored passes
        assert (merged["boxes"][:, 0] >= 0).all() and (merged["boxes"][:, 2] <= 64).all()


@torch.no_grad()
def test_flip_tta_on_a_left_right_symmetric_image_keeps_detections_and_their_mirrors(trained):
    """A symmetric image is its own mirror: the flipped pass finds the same boxes, and they must
    come back as the mirror images of the unflipped ones (mirrored about the original width)."""
    _, model = _trained_model(*trained)
    half = torch.rand(3, 48, 32, generator=torch.Generator().manual_seed(1))
    image = torch.cat([half, half.flip(-1)], -1)
    plain = model([image], original_sizes=[(48, 64)])[0]
    (merged,) = TTAModel(model, [1.0], True, 1.0, 10 ** 6)([image], original_sizes=[(48, 64)])  # NMS keeps all
    assert len(merged["boxes"]) == 2 * len(plain["boxes"])
    assert _as_set(merged) == _as_set(plain) | _as_set(_mirrored(plain, 64))


def test_eval_and_predict_run_with_tta(trained, tmp_path, capsys):
    config, checkpoint = trained

    def evaluate(name, *extra):
        out = tmp_path / name
        assert eval_main(["--config", str(config), "--checkpoint", str(checkpoint), "--no-progress",
                          "--output-dir", str(out), *extra]) == 0
        return json.loads((out / "metrics.json").read_text()), json.loads((out / "coco_results.json").read_text())

    plain_metrics, plain = evaluate("plain")
    one_pass_metrics, one_pass = evaluate("one_pass", "--tta", "tta.flip=false")
    assert "[tta] 1 passes" in capsys.readouterr().out
    assert one_pass_metrics["tta"] is True and plain_metrics["tta"] is False
    assert _results(one_pass) == _results(plain) and one_pass_metrics["AP50"] == plain_metrics["AP50"]

    tta_metrics, four_passes = evaluate("tta", "--tta", "tta.min_sizes=[48]", "tta.flip=true")
    printed = capsys.readouterr().out
    assert "[tta] 4 passes" in printed and "each also mirrored" in printed
    assert tta_metrics["tta"] is True and _results(four_passes) != _results(plain)
    assert all(0 <= x and x + w <= 64.01 for x, _, w, _ in (r["bbox"] for r in four_passes))  # 64 px val images

    # predict --tta with flip: the image's detections and its mirror's, mirrored back (merged by NMS)
    image, mirror = _an_image(tmp_path)
    assert predict_main(["--config", str(config), "--checkpoint", str(checkpoint), str(image), str(mirror),
                         "--score-thresh", "0", "--output-dir", str(tmp_path / "pred"), "--no-progress"]) == 0
    assert predict_main(["--config", str(config), "--checkpoint", str(checkpoint), str(image), "--tta",
                         "tta.flip=true", "--score-thresh", "0", "--output-dir", str(tmp_path / "pred_tta"),
                         "--no-progress"]) == 0
    found = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    tta = json.loads((tmp_path / "pred_tta" / "predictions.json").read_text())
    direct = [p for p in found if p["file_name"] == str(image)]
    mirrored_back = [dict(p, bbox=[64 - p["bbox"][0] - p["bbox"][2], *p["bbox"][1:]])
                     for p in found if p["file_name"] == str(mirror)]
    assert tta and all(_matches(p, direct) or _matches(p, mirrored_back) for p in tta)
    assert any(_matches(p, direct) for p in tta) and not all(_matches(p, direct) for p in tta)  # both passes count


def _matches(prediction: dict, candidates: list[dict]) -> bool:
    return any(c["category_id"] == prediction["category_id"] and abs(c["score"] - prediction["score"]) < 2e-5
               and max(abs(a - b) for a, b in zip(c["bbox"], prediction["bbox"])) < 0.03 for c in candidates)


def _results(results: list[dict]) -> list:
    return sorted((r["image_id"], r["category_id"], round(r["score"], 4), *(round(v, 2) for v in r["bbox"]))
                  for r in results)


def _an_image(tmp_path):
    """A 64 x 48 image (no resize at the 64 px evaluation size) and its mirror image."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "im.png")
    Image.fromarray(pixels[:, ::-1].copy()).save(tmp_path / "mirror.png")
    return tmp_path / "im.png", tmp_path / "mirror.png"
