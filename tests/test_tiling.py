"""data.tiling: the tile grid, ground truth cut to a tile (ignore regions), the tiled training
dataset and its sampler, sliced inference's merge, and one tiny tiled train + predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from pycocotools import mask as mask_utils
from torch import nn

from conftest import ann, tiny_dict, write_coco
from rcnn_trainer.data.coco import CocoDetection
from rcnn_trainer.data.tiled_dataset import TiledBatchSampler, TiledDataset
from rcnn_trainer.data.tiling import cut_boxes, tile_grid, tile_masks
from rcnn_trainer.data.transforms import build_transforms
from rcnn_trainer.infer.sliced import SlicedModel, merged_rle
from rcnn_trainer.model.ignore import ignore_overlapping


@pytest.mark.parametrize("height, width, size, overlap", [(700, 1000, 256, 0.25), (300, 257, 128, 0.2),
                                                          (100, 90, 128, 0.2)])
def test_tile_grid_covers_the_image_with_the_overlap(height, width, size, overlap):
    windows = tile_grid(height, width, size, overlap)
    covered = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height and x1 - x0 <= size and y1 - y0 <= size
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    xs = sorted({w[0] for w in windows})
    ends = sorted({w[2] for w in windows})
    for start, previous_end in zip(xs[1:], ends):  # neighbours share at least overlap x size
        assert previous_end - start >= int(overlap * size) - 1
    if max(height, width) <= size:
        assert windows == [(0, 0, width, height)]


def test_boxes_are_cut_to_the_tile_and_barely_visible_ones_become_ignore_regions():
    boxes = np.array([[110, 110, 120, 120],  # inside
                      [90, 120, 110, 130],   # half inside (x 100-110 of 90-110): kept at min_visible 0.5
                      [10, 10, 105, 20],     # above the tile: neither
                      [0, 0, 50, 50]], np.float32)  # outside: neither
    kept, cut, ignore = cut_boxes(boxes, (100, 100, 200, 200), min_visible=0.5)
    assert kept.tolist() == [0, 1]
    assert cut.tolist() == [[10, 10, 20, 20], [0, 20, 10, 30]]
    assert ignore.tolist() == []
    # 5 of 95 px inside: an ignore region
    kept, cut, ignore = cut_boxes(np.array([[10, 150, 105, 160]], np.float32), (100, 100, 200, 200), 0.5)
    assert kept.tolist() == [] and ignore.tolist() == [[0, 50, 5, 60]]


def test_masks_are_cut_with_their_tile():
    polygon = [[40, 40, 90, 40, 90, 70, 40, 70]]  # crosses the tile edge at x = 64
    full = mask_utils.decode(mask_utils.frPyObjects(polygon, 100, 100))[:, :, 0]
    rle = mask_utils.encode(np.asfortranarray(full))
    window = (64, 32, 100, 96)
    from_polygon = tile_masks([polygon], 100, 100, window, (64, 36))[0]
    from_rle = tile_masks([rle], 100, 100, window, (64, 36))[0]
    expected = full[32:96, 64:100]
    assert expected.sum() > 100
    assert (from_rle == expected).all()
    assert (from_polygon != expected).sum() <= 64  # rasterization of a shifted polygon: edge pixels at most


def test_ignore_regions_take_negatives_out_of_sampling_and_leave_positives():
    candidates = torch.tensor([[0, 0, 10, 10], [0, 0, 9, 10], [50, 50, 60, 60], [100, 100, 110, 110.]])
    labels = torch.tensor([1, 0, 0, 0])
    out = ignore_overlapping(labels, candidates, torch.tensor([[0, 0, 10, 10], [51, 51, 61, 61.]]), 0.5)
    assert out.tolist() == [1, -1, -1, 0]
    assert ignore_overlapping(labels, candidates, torch.zeros((0, 4)), 0.5) is labels


def _large_split(tmp_path, size=256):
    images = [{"id": i, "file_name": f"im{i}.png", "width": size, "height": size} for i in (1, 2)]
    anns = [ann(1, 1, 7, [10, 10, 20, 20]), ann(2, 1, 7, [120, 40, 30, 20]), ann(3, 2, 3, [200, 200, 30, 30])]
    path = write_coco(tmp_path, images, anns)
    return CocoDetection(path, tmp_path, transforms=build_transforms(128, 128, 0.5, train=True), seed=3)


def test_tiled_dataset_decodes_each_image_once_per_epoch_and_is_a_function_of_seed_epoch_item(tmp_path):
    base = _large_split(tmp_path)
    tiled = TiledDataset(base, size=128, overlap=0.25, min_visible=0.5, empty_share=0.5, whole_image=True)
    assert len(tiled) == 2 * (9 + 1)  # 3 x 3 tiles (starts 0, 64, 128) + the whole image, per image
    sampler = TiledBatchSampler(tiled, batch_size=4, seed=3, group_by_aspect=True)
    draws = sampler.epoch_draws(0)
    assert [tiled.items[i].record for i, _, _ in draws] == sorted(
        (tiled.items[i].record for i, _, _ in draws), key=[tiled.items[i].record for i, _, _ in draws].index)
    empties = sum(tiled.items[i].empty for i, _, _ in draws)
    assert empties < sum(item.empty for item in tiled.items)  # empty tiles: drawn by a coin of empty_share
    items = [tiled[draw] for draw in draws]
    assert tiled.decoded == 2  # once per image, the tiles of one image come together
    again = TiledDataset(base, size=128, overlap=0.25, min_visible=0.5, empty_share=0.5, whole_image=True)
    for draw, (image, target) in list(zip(draws, items))[:6]:  # a resumed run reads the same
        image2, target2 = again[draw]
        assert torch.equal(image, image2) and torch.equal(target["boxes"], target2["boxes"])
    for image, target in items:
        h, w = image.shape[-2:]
        assert (h, w) == (128, 128) and "ignore_boxes" in target and (target["labels"] > 0).all()
        assert (target["boxes"][:, 2:] <= 128).all() and (target["boxes"][:, :2] >= 0).all()


class ObjectPainter(nn.Module):
    """A stand-in detector that reports the part of one known object inside each view, in the
    view's original pixels, as a detector that saw it would."""

    def __init__(self, obj, image_size):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.obj, self.image_size = obj, image_size
        self.views = []

    def forward(self, images, original_sizes=None, masks=True):
        out = []
        for image, size in zip(images, original_sizes):
            window = self.views.pop(0)
            x0, y0, x1, y1 = self.obj
            box = torch.tensor([[max(x0, window[0]) - window[0], max(y0, window[1]) - window[1],
                                 min(x1, window[2]) - window[0], min(y1, window[3]) - window[1]]], dtype=torch.float32)
            visible = bool((box[:, 2] > box[:, 0]).all() and (box[:, 3] > box[:, 1]).all())
            out.append({"boxes": box if visible else box[:0], "scores": torch.tensor([0.9] if visible else []),
                        "labels": torch.tensor([1] if visible else [], dtype=torch.int64)})
        return out


@pytest.mark.parametrize("merge, expected", [("greedy", 1), ("nms", None)])
def test_sliced_merge_reports_original_pixels_and_joins_a_box_split_across_tiles(merge, expected):
    obj = (100.0, 40.0, 150.0, 70.0)  # crosses the border of the first tile (x < 128)
    painter = ObjectPainter(obj, (100, 256))
    sliced = SlicedModel(painter, size=128, overlap=0.25, whole_image=False, min_size=128, max_size=128,
                         merge=merge, batch_size=3)
    image = torch.zeros(3, 100, 256, dtype=torch.uint8)
    painter.views = list(sliced.views(100, 256))
    (det,) = sliced([image])
    assert painter.views == []  # every view ran, in batches
    assert (det["boxes"][:, 2] <= 256).all() and (det["boxes"][:, 0] >= 0).all()
    if expected is not None:
        assert len(det["boxes"]) == expected
        assert det["boxes"][0].tolist() == list(obj)  # the union of its parts, in original pixels
    else:  # NMS keeps boxes as they are: parts, in original pixels (a cut part may even win over the whole)
        assert len(det["boxes"]) >= 1
        for x0, y0, x1, y1 in det["boxes"].tolist():
            assert obj[0] <= x0 < x1 <= obj[2] and obj[1] <= y0 < y1 <= obj[3]


def test_merged_masks_are_rles_of_the_union_in_original_pixels():
    a = np.ones((3, 4), bool)
    b = np.ones((2, 2), bool)
    rle = merged_rle([(a, 5, 2), (b, 8, 4)], 10, 12)
    decoded = mask_utils.decode(dict(rle, counts=rle["counts"].encode()))
    expected = np.zeros((10, 12), np.uint8)
    expected[2:5, 5:9] = 1
    expected[4:6, 8:10] = 1
    assert decoded.shape == (10, 12) and (decoded == expected).all()


def test_tiled_training_and_sliced_prediction_end_to_end(tmp_path):
    from rcnn_trainer.cli import predict_main, train_main
    from rcnn_trainer.config_loader import validate_config
    from rcnn_trainer.data.loader import resolve_splits

    raw = tiny_dict(tmp_path, data={"synthetic": {"num_train": 4, "num_val": 2, "image_size": 256, "seed": 3},
                                    "min_size": 128, "max_size": 128, "tiling": {"size": 128, "overlap": 0.25}},
                    solver={"max_iters": 3})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert train_main(["--config", str(config), "--no-progress"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if line.get("type") == "eval"]
    assert evals and "AP" in evals[-1] and "val/loss" in evals[-1]
    val_file = sorted(resolve_splits(validate_config(raw, source="test"))["val"][1].glob("val_*.png"))[0]
    assert predict_main(["--config", str(config), "--checkpoint", str(tmp_path / "run" / "model_final.pth"),
                         str(val_file), "--output-dir", str(tmp_path / "pr"), "--score-thresh", "0.0",
                         "--no-progress", "--no-draw"]) == 0
    predictions = json.loads((tmp_path / "pr" / "predictions.json").read_text())
    assert predictions
    right = [x + w for x, _, w, _ in (p["bbox"] for p in predictions)]
    bottom = [y + h for _, y, _, h in (p["bbox"] for p in predictions)]
    assert max(right) <= 256.01 and max(bottom) <= 256.01 and min(p["bbox"][0] for p in predictions) >= 0
    assert max(right) > 128 and max(bottom) > 128  # the tiles beyond the first, in original pixels
