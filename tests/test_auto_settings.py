"""Settings derived from the data: num_classes and anchor sizes (`auto`), a data source that
replaces the base's, and the batch sampler on datasets smaller than a batch."""

from __future__ import annotations

import pytest

from conftest import ann, image, tiny_dict, write_coco, write_yaml
from rcnn_trainer.cli import train_main
from rcnn_trainer.config_loader import load_config, validate_config
from rcnn_trainer.data.loader import TrainBatchSampler, build_dataset
from rcnn_trainer.data.settings import resolve_from_checkpoint, resolve_from_data
from rcnn_trainer.errors import UserError
from rcnn_trainer.data.anchor_fit import best_anchor_ious, fit_anchor_sizes, resized_boxes
from rcnn_trainer.model.build import build_model


def coco_split(folder, categories, sizes=(12, 20, 30, 48), count=8):
    images, annotations = [], []
    for i in range(1, count + 1):
        images.append(image(i, 128, 96))
        for k, side in enumerate(sizes):
            annotations.append(ann(len(annotations) + 1, i, categories[(i + k) % len(categories)]["id"],
                                   [4 + 28 * k, 10 + (i % 3) * 10, side * 0.5, side]))
    return write_coco(folder, images, annotations, categories=categories)


def coco_config(tmp_path, categories, **model):
    ann_file = coco_split(tmp_path / "data", categories)
    split = {"ann_file": str(ann_file), "img_dir": str(tmp_path / "data")}
    raw = tiny_dict(tmp_path, data={"train": split, "val": split, "min_size": 96, "max_size": 128}, model=model)
    raw["data"].pop("synthetic")
    raw["model"].pop("num_classes")
    raw["model"].pop("anchors")
    return raw


NON_CONTIGUOUS = [{"id": 17, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 250, "name": "bird"}]


def test_num_classes_and_anchors_auto_from_non_contiguous_ids(tmp_path):
    cfg = validate_config(coco_config(tmp_path, NON_CONTIGUOUS), source="test")
    assert cfg.model.num_classes == "auto" and cfg.model.anchors.sizes == "auto"
    lines = []
    dataset = build_dataset(cfg, "train")
    user_config = cfg.model_dump()
    resolved = resolve_from_data(cfg, dataset, lines.append)
    assert cfg.model_dump() == user_config  # the user's config object is never changed
    cfg = resolved
    assert cfg.model.num_classes == 3
    assert "model.num_classes: 3" in lines[0] and "dog, cat, bird" in lines[0]  # sorted by category id
    sizes = cfg.model.anchors.sizes
    assert len(sizes) == 5 and all(b[0] == pytest.approx(2 * a[0], rel=0.01) for a, b in zip(sizes, sizes[1:]))
    assert "fitted to 32 training boxes" in lines[1] and "have an anchor with IoU >= 0.5" in lines[1]


def test_fitted_anchors_cover_better_than_mismatched_ones(tmp_path):
    cfg = validate_config(coco_config(tmp_path, NON_CONTIGUOUS), source="test")
    dataset = build_dataset(cfg, "train")
    common = dict(aspect_ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64])
    sizes, reach = fit_anchor_sizes(dataset.records, levels=5, min_size=96, max_size=128, fg_iou_thresh=0.7, **common)
    shaped = resized_boxes(dataset.records, 96, 128)
    fitted = best_anchor_ious(shaped, sizes, **common)
    too_large = best_anchor_ious(shaped, [[64], [128], [256], [512], [1024]], **common)
    assert (fitted >= 0.5).float().mean() == pytest.approx(reach["above_0.5"])
    assert reach["above_0.5"] > 0.9 > float((too_large >= 0.5).float().mean())


@pytest.mark.parametrize("height, width", [(480, 640), (333, 500), (97, 130)])
@pytest.mark.parametrize("sizes, strides", [([[32], [64], [128], [256], [512]], [4, 8, 16, 32, 64]),
                                            ([[33.5, 40], [66.9, 80], [133.9, 160]], [16, 32, 64])])
def test_best_anchor_iou_equals_the_brute_force_over_every_anchor(height, width, sizes, strides):
    """The nearest-center shortcut scores the same best anchor as box_iou against all of them."""
    import numpy as np
    import torch
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.ops import box_iou

    g = torch.Generator().manual_seed(0)
    limit = torch.tensor([width, height]).float()
    corner = torch.rand(300, 2, generator=g) * limit
    boxes = torch.cat([corner, torch.maximum((corner + torch.rand(300, 2, generator=g) * limit * 0.6).minimum(limit),
                                             corner + 0.5)], dim=1)
    ratios = [0.5, 1.0, 2.0]
    generator = AnchorGenerator(tuple(tuple(s) for s in sizes), (tuple(ratios),) * len(sizes))
    padded = (int(np.ceil(height / 32) * 32), int(np.ceil(width / 32) * 32))
    features = [torch.empty(1, 1, int(np.ceil(padded[0] / s)), int(np.ceil(padded[1] / s))) for s in strides]
    anchors = generator(ImageList(torch.empty(1, 3, *padded), [(height, width)]), features)[0]
    brute = box_iou(boxes, anchors).max(dim=1).values
    fast = best_anchor_ious([((height, width), boxes)], sizes, ratios, strides)
    assert torch.allclose(fast, brute, atol=1e-6)
    assert fast.min() < 0.5 < fast.max()  # the boxes span good and poor coverage


def test_explicit_num_classes_that_disagrees_is_exit_2(tmp_path, capsys):
    raw = coco_config(tmp_path, NON_CONTIGUOUS)
    raw["model"]["num_classes"] = 5
    config = write_yaml(tmp_path / "c.yaml", raw)
    assert train_main(["--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.num_classes is 5" in err and "has 3 categories" in err and "(or auto)" in err


def test_eval_takes_auto_settings_from_the_checkpoint(tmp_path):
    cfg = validate_config(coco_config(tmp_path, NON_CONTIGUOUS), source="test")
    cfg = resolve_from_checkpoint(cfg, {"model": {"num_classes": 3, "anchors": {"sizes": [[8], [16], [32], [64], [128]]}}})
    assert cfg.model.num_classes == 3 and cfg.model.anchors.sizes[0] == [8]


def head_of(cfg) -> tuple:
    return cfg.model.backbone.fpn_channels, cfg.model.roi.representation_size, cfg.model.roi.batch_size_per_image


@pytest.mark.parametrize("num_categories, expected", [(3, (64, 256, 64)), (9, (64, 256, 64)), (10, (128, 1024, 128)),
                                                      (26, (128, 1024, 128))])
def test_head_size_auto_follows_the_number_of_classes(tmp_path, num_categories, expected):
    categories = [{"id": 100 + 3 * i, "name": f"c{i}"} for i in range(num_categories)]
    raw = coco_config(tmp_path, categories, backbone={"fpn_channels": "auto"},
                      roi={"representation_size": "auto", "batch_size_per_image": "auto"})
    cfg = validate_config(raw, source="test")
    lines = []
    cfg = resolve_from_data(cfg, build_dataset(cfg, "train"), lines.append)
    assert head_of(cfg) == expected
    head_line = next(line for line in lines if "fpn_channels" in line)
    assert f"model.backbone.fpn_channels: {expected[0]}" in head_line and f"for {num_categories} classes" in head_line
    # explicit numbers stay as given
    explicit = validate_config(coco_config(tmp_path, categories, backbone={"fpn_channels": 32},
                                           roi={"representation_size": 48, "batch_size_per_image": 16}), source="test")
    explicit = resolve_from_data(explicit, build_dataset(explicit, "train"), lines.append)
    assert head_of(explicit) == (32, 48, 16)


def test_config_yaml_sizes_its_head_from_the_classes():
    cfg = load_config("config.yaml")
    assert head_of(cfg) == ("auto", "auto", "auto")
    with pytest.raises(ValueError, match="model.backbone.fpn_channels, model.roi.representation_size, "
                                         "model.roi.batch_size_per_image still 'auto'"):
        build_model(load_config("config.yaml", ["model.num_classes=3", "model.anchors.sizes=[[8],[16],[32],[64],[128]]"]).model)


def test_eval_takes_the_head_size_from_the_checkpoint_or_says_what_is_missing(tmp_path):
    raw = coco_config(tmp_path, NON_CONTIGUOUS, backbone={"fpn_channels": "auto"},
                      roi={"representation_size": "auto", "batch_size_per_image": "auto"})
    cfg = validate_config(raw, source="test")
    saved = {"model": {"num_classes": 3, "anchors": {"sizes": [[8], [16], [32], [64], [128]]},
                       "backbone": {"fpn_channels": 128}, "roi": {"representation_size": 1024, "batch_size_per_image": 128}}}
    cfg = resolve_from_checkpoint(cfg, saved)
    assert head_of(cfg) == (128, 1024, 128)
    older = validate_config(raw, source="test")
    with pytest.raises(UserError, match="no resolved model.backbone.fpn_channels, model.roi.representation_size"):
        resolve_from_checkpoint(older, {"model": {"num_classes": 3, "anchors": {"sizes": [[8]] * 5},
                                                  "backbone": {"fpn_channels": "auto"}}})


def test_user_data_replaces_synthetic_of_the_base(tmp_path):
    base = write_yaml(tmp_path / "base.yaml", tiny_dict(tmp_path))
    ann_file = coco_split(tmp_path / "data", NON_CONTIGUOUS)
    split = {"ann_file": str(ann_file), "img_dir": str(tmp_path / "data")}
    user = write_yaml(tmp_path / "user.yaml", {"_base_": "base.yaml", "data": {"train": split, "val": split},
                                               "model": {"num_classes": "auto"}})
    notes = []
    cfg = load_config(user, log=notes.append)
    assert cfg.data.synthetic is None and cfg.data.train is not None
    assert notes == [f"[config] {user} sets data.train: it replaces data.synthetic of the base config."]
    # the same through an override
    notes.clear()
    cfg = load_config(base, [f"data.train={split}", f"data.val={split}", "model.num_classes=auto"], log=notes.append)
    assert cfg.data.synthetic is None and len(notes) == 1 and "replaces data.synthetic" in notes[0]


@pytest.mark.parametrize("num_images, batch, world", [(1, 8, 1), (3, 8, 1), (4, 8, 2), (5, 2, 4)])
def test_sampler_yields_when_the_dataset_is_smaller_than_a_batch(num_images, batch, world):
    batches = [TrainBatchSampler([1.5] * num_images, batch, seed=0, group_by_aspect=True, rank=r, world_size=world)
               for r in range(world)]
    streams = [iter(b) for b in batches]
    for _ in range(5):
        for stream in streams:
            got = next(stream)
            assert len(got) == batch and all(0 <= index < num_images for index, *_ in got)


def test_sampler_with_aspect_groups_smaller_than_the_batch():
    ratios = [1.5, 0.5, 1.5, 0.5, 2.0]  # 3 landscape, 2 portrait, batch 4
    stream = iter(TrainBatchSampler(ratios, 4, seed=0, group_by_aspect=True))
    seen = [next(stream) for _ in range(6)]
    for batch in seen:
        assert len({ratios[i] >= 1.0 for i, *_ in batch}) == 1  # one orientation per batch
    assert {ratios[i] >= 1.0 for b in seen for i, *_ in b} == {True, False}  # both groups get batches


def test_small_dataset_trains_end_to_end(tmp_path):
    raw = coco_config(tmp_path, NON_CONTIGUOUS)
    raw["data"]["batch_size"] = 16  # 8 images
    raw["solver"]["max_iters"] = 2
    config = write_yaml(tmp_path / "c.yaml", raw)
    assert train_main(["--config", str(config), "--no-progress"]) == 0
