"""Instance masks: the loss's start and normalization, the data path (polygons, RLE, bad
masks), and outputs (segm metrics, RLE predictions). torchvision MaskRCNN parity is in
test_model.py beside the FasterRCNN one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from pycocotools import mask as mask_utils

from conftest import ann, image, tiny_config, tiny_dict, write_coco
from rcnn_trainer.cli import eval_main, predict_main, train_main
from rcnn_trainer.data.coco import CocoDetection, RecordPolicy
from rcnn_trainer.data.transforms import build_transforms
from rcnn_trainer.errors import UserError
from rcnn_trainer.model.build import build_model

MASK = {"mask": {"enabled": True, "num_convs": 2, "conv_channels": 32}}
EXHAUSTIVE = {"rpn": {"batch_size_per_image": 100000, "positive_fraction": 1.0},
              "roi": {"batch_size_per_image": 100000, "positive_fraction": 1.0}}


def scene(num_boxes: int, size: int = 64, seed: int = 0):
    """An image with boxes and, inside each, an elliptic mask."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num_boxes, 2, generator=g) * (size - 20)
    wh = torch.rand(num_boxes, 2, generator=g) * 12 + 6
    boxes = torch.cat([xy, xy + wh], 1)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    masks = torch.zeros(num_boxes, size, size, dtype=torch.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        masks[k] = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).to(torch.uint8)
    target = {"boxes": boxes, "labels": torch.randint(1, 5, (num_boxes,), generator=g), "masks": masks}
    return torch.rand(3, size, size, generator=g), target


def losses_of(model, images, targets):
    torch.manual_seed(0)
    losses, stats = model(images, targets)
    return {k: float(v.detach()) for k, v in losses.items()}, stats


def test_first_step_mask_loss_is_ln2(tmp_path):
    model = build_model(tiny_config(tmp_path, model=MASK).model).train()
    images, targets = zip(*[scene(5, seed=s) for s in range(4)])
    losses, stats = losses_of(model, list(images), list(targets))
    assert losses["loss_roi_mask"] == pytest.approx(math.log(2), rel=0.10)
    assert float(stats["avg_factor/roi_mask"]) >= 20  # the positives: at least the 20 appended GT boxes


@pytest.mark.parametrize("repeat", [2, 3])
def test_repeating_images_leaves_the_mask_loss_unchanged(tmp_path, repeat):
    model = build_model(tiny_config(tmp_path, model={**EXHAUSTIVE, **MASK}).model).train()
    img, target = scene(3)
    one, stats_one = losses_of(model, [img], [target])
    many, stats_many = losses_of(model, [img] * repeat, [target] * repeat)
    assert many["loss_roi_mask"] == pytest.approx(one["loss_roi_mask"], rel=1e-4)
    assert float(stats_many["avg_factor/roi_mask"]) == repeat * float(stats_one["avg_factor/roi_mask"])


def test_mask_loss_does_not_scale_with_the_number_of_objects(tmp_path):
    model = build_model(tiny_config(tmp_path, model=MASK).model).train()
    few, _ = losses_of(model, [scene(1, seed=1)[0]], [scene(1, seed=1)[1]])
    lots, _ = losses_of(model, [scene(40, seed=1)[0]], [scene(40, seed=1)[1]])
    assert 0.5 < lots["loss_roi_mask"] / few["loss_roi_mask"] < 2.0, (few, lots)


def test_images_without_objects_give_a_zero_mask_loss_with_a_gradient(tmp_path):
    model = build_model(tiny_config(tmp_path, model=MASK).model).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}
    losses, _ = model([torch.rand(3, 64, 64)] * 2, [empty, empty])
    assert float(losses["loss_roi_mask"]) == 0.0
    sum(losses.values()).backward()  # the graph holds: DDP needs every parameter in it


def _rle(mask: np.ndarray, compressed: bool = True) -> dict:
    if not compressed:  # COCO's uncompressed form: run lengths in column-major order
        flat = mask.flatten(order="F")
        changes = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
        return {"size": list(mask.shape), "counts": np.diff(np.r_[0, changes]).tolist()}
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def mask_dataset(tmp_path, segmentations, **kwargs):
    """One 40 x 30 image with one object per segmentation (box [4, 4, 20, 16])."""
    anns = [dict(ann(k + 1, 1, 1, [4, 4, 20, 16]), segmentation=s) for k, s in enumerate(segmentations)]
    path = write_coco(tmp_path, [image(1, 40, 30)], anns, [{"id": 1, "name": "thing"}])
    return CocoDetection(path, tmp_path, masks=True, **kwargs)


def test_polygons_and_both_rle_forms_give_the_same_mask(tmp_path):
    expected = np.zeros((30, 40), np.uint8)
    expected[4:20, 4:24] = 1
    polygon = [[4, 4, 24, 4, 24, 20, 4, 20]]
    dataset = mask_dataset(tmp_path, [polygon, _rle(expected), _rle(expected, compressed=False)])
    masks = dataset[0][1]["masks"].numpy()
    assert masks.shape == (3, 30, 40)
    assert (masks[1] == expected).all() and (masks[2] == expected).all()
    assert (masks[0] != expected).sum() <= 40  # the polygon's edge pixels may differ by rasterization


def test_masks_follow_resize_and_flip(tmp_path):
    mask = np.zeros((30, 40), np.uint8)
    mask[4:20, 4:14] = 1  # the left half of the box
    dataset = mask_dataset(tmp_path, [_rle(mask)])
    dataset.transforms = build_transforms(60, 80, hflip_prob=1.0, train=True)
    img, target = dataset[(0, 0)]
    masks, box = target["masks"][0], target["boxes"][0]
    assert masks.shape == img.shape[-2:] == (60, 80)
    ys, xs = torch.nonzero(masks, as_tuple=True)
    assert xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1  # inside the flipped box
    assert xs.float().mean() > (box[0] + box[2]) / 2  # the left half is now on the right


@pytest.mark.parametrize("segmentation, problem", [
    ([[4, 4, 24, 4]], "at least 3 points"),
    ([[4, 4, 4, 4, 4, 4]], "empty"),
    ({"size": [20, 20], "counts": "abc"}, "size"),
    ([], "no segmentation"),
    ({"size": [30, 40], "counts": [5, 10]}, "covers"),
])
def test_bad_masks_exit_2_naming_the_record_or_are_dropped_and_counted(tmp_path, segmentation, problem):
    good = [[4, 4, 24, 4, 24, 20, 4, 20]]
    with pytest.raises(UserError, match=r"annotations\[1\] \(id 2.*" + problem):
        mask_dataset(tmp_path, [good, segmentation], policy=RecordPolicy(bad_mask="error"))
    dataset = mask_dataset(tmp_path, [good, segmentation], policy=RecordPolicy(bad_mask="drop"))
    assert len(dataset.records[0].labels) == 1 and dataset.report.counts["bad_mask"] == 1
    assert len(dataset[0][1]["masks"]) == 1
    assert 2 not in {a["id"] for a in dataset.evaluation_json["annotations"]}  # nor scored


def test_mask_run_reports_segm_metrics_and_predicts_rles_that_decode_to_the_drawing(tmp_path):
    raw = tiny_dict(tmp_path, solver={"max_iters": 4}, train={"eval_period": 4}, model=MASK)
    config = tmp_path / "mask.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert train_main(["--config", str(config), "--no-progress"]) == 0
    run = tmp_path / "run"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "eval"]
    assert evals and all(k in evals[-1] for k in ("segm_AP", "segm_AP50", "segm_AP75", "segm_APs", "segm_APm",
                                                   "segm_APl", "AP"))
    assert any(k.startswith("segm_AP/") for k in evals[-1])  # per-class mask AP
    assert eval_main(["--config", str(config), "--checkpoint", str(run / "model_final.pth"),
                      "--output-dir", str(tmp_path / "ev"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert "segm_AP" in metrics and set(metrics["per_class_segm_AP"]) == {"square", "circle", "triangle", "cross"}
    val_file = sorted(_val_split(raw)[1].glob("val_*.png"))[0]
    assert predict_main(["--config", str(config), "--checkpoint", str(run / "model_final.pth"), str(val_file),
                         "--output-dir", str(tmp_path / "pr"), "--score-thresh", "0.0", "--no-progress"]) == 0
    predictions = json.loads((tmp_path / "pr" / "predictions.json").read_text())
    assert predictions and all("segmentation" in p for p in predictions)
    # each RLE decodes to the mask the model draws for that detection: its probabilities at 0.5,
    # at the image's size, around the detection's box (recomputed here from the checkpoint)
    expected = _model_masks(config, run / "model_final.pth", val_file)
    from PIL import Image
    with Image.open(val_file) as img:
        size = (img.height, img.width)
    compared = 0
    for prediction in predictions[:10]:
        decoded = mask_utils.decode(dict(prediction["segmentation"], counts=prediction["segmentation"]["counts"].encode()))
        assert decoded.shape == size
        box, mask = next((b, m) for b, c, m in expected if c == prediction["category_id"]
                         and max(abs(u - v) for u, v in zip(b, prediction["bbox"])) < 0.05)
        intersection, union = (decoded & mask).sum(), (decoded | mask).sum()
        assert union == 0 or intersection / union > 0.95, (prediction, intersection, union)
        ys, xs = np.nonzero(decoded)
        if len(xs):  # pasted into the box (grown by a 28 -> 30 px border: 1/14 of it on each side)
            x, y, w, h = box
            assert x - w / 14 - 1 <= xs.min() and xs.max() <= x + w + w / 14 + 1, (box, xs.min(), xs.max())
            assert y - h / 14 - 1 <= ys.min() and ys.max() <= y + h + h / 14 + 1, (box, ys.min(), ys.max())
            compared += 1
    assert compared >= 3  # non-empty masks among the top detections


@torch.no_grad()
def _model_masks(config, checkpoint, image_file):
    """(xywh box, category id, binary mask at 0.5) of every detection of the checkpoint's model."""
    from PIL import Image

    from rcnn_trainer.config_loader import load_config
    from rcnn_trainer.runtime.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    cfg = load_config(config)
    model = build_model(cfg.model).eval()
    model.load_state_dict(ckpt["model"])
    with Image.open(image_file) as img:
        img = img.convert("RGB")
        tensor, _ = build_transforms(cfg.data.test_min_size, cfg.data.max_size, 0.0, train=False)(
            img, {"boxes": torch.zeros(0, 4)}, None)
        (det,) = model([tensor], original_sizes=[(img.height, img.width)])
    to_cat = {int(k): int(v) for k, v in ckpt["label_to_cat_id"].items()}
    return [([x0, y0, x1 - x0, y1 - y0], to_cat[int(label)], (mask[0] >= 0.5).numpy().astype(np.uint8))
            for (x0, y0, x1, y1), label, mask in zip(det["boxes"].tolist(), det["labels"], det["masks"])]


def _val_split(raw):
    from rcnn_trainer.config_loader import validate_config
    from rcnn_trainer.data.loader import resolve_splits

    return resolve_splits(validate_config(raw, source="test"))["val"]


def test_masks_on_a_file_without_segmentations_says_so(tmp_path):
    ann_file = write_coco(tmp_path, [image(1, 40, 30), image(2, 40, 30)],
                          [ann(1, 1, 7, [2, 4, 10, 12]), ann(2, 2, 3, [5, 5, 10, 10])])
    with pytest.raises(UserError, match="none of its 2 objects has a usable segmentation.*model.mask.enabled=false"):
        CocoDetection(ann_file, tmp_path, masks=True, check_images=0)
