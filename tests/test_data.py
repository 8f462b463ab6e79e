"""Data: COCO parsing, bad-record policies, id mapping, transforms, synthetic determinism."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ann, image, tiny_dict, write_coco, write_yaml
from rcnn_trainer.cli import train_main
from rcnn_trainer.config_loader import validate_config
from rcnn_trainer.data.coco import CocoDetection, RecordPolicy
from rcnn_trainer.data.synthetic import ensure_synthetic_dataset
from rcnn_trainer.data.transforms import hflip_boxes, resize_scale, build_transforms
from rcnn_trainer.infer.evaluate import to_coco_results
from rcnn_trainer.errors import UserError


def test_parse_xywh_to_xyxy_and_contiguous_ids(tmp_path):
    path = write_coco(tmp_path, [image(1), image(2)],
                      [ann(1, 1, 7, [2, 3, 10, 5]), ann(2, 1, 3, [0, 0, 4, 4]), ann(3, 1, 7, [5, 5, 5, 5], crowd=1)])
    ds = CocoDetection(path, tmp_path)
    assert ds.label_to_cat_id == {1: 3, 2: 7}  # sorted category ids -> 1..C
    img, target = ds[0]
    assert img.shape == (3, 30, 40) and float(img.max()) <= 1.0
    assert target["boxes"].tolist() == [[2, 3, 12, 8], [0, 0, 4, 4]]
    assert target["labels"].tolist() == [2, 1]
    assert ds.records[0].num_crowd == 1  # crowd kept out of training targets
    assert len(ds[1][1]["boxes"]) == 0  # image without objects stays as a negative


def test_id_mapping_round_trip(tmp_path):
    path = write_coco(tmp_path, [image(5)], [ann(1, 5, 7, [1, 1, 8, 8])])
    ds = CocoDetection(path, tmp_path)
    _, target = ds[0]
    det = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(1)}
    (result,) = to_coco_results([(target["image_id"], det)], ds.label_to_cat_id)
    assert result["category_id"] == 7 and result["image_id"] == 5 and result["bbox"] == [1, 1, 8, 8]


def test_not_coco_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        CocoDetection(tmp_path / "none.json", tmp_path)
    (tmp_path / "x.json").write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="not COCO format: the key 'annotations'"):
        CocoDetection(tmp_path / "x.json", tmp_path)
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        CocoDetection(tmp_path / "y.json", tmp_path)


def test_missing_and_unreadable_images(tmp_path):
    path = write_coco(tmp_path, [image(1), image(2)], [ann(1, 1, 7, [1, 1, 5, 5])])
    (tmp_path / "im2.png").write_text("not an image")
    with pytest.raises(UserError, match=r"image id 2 .*im2.png.*not a readable image.*bad_records.missing_image"):
        CocoDetection(path, tmp_path)
    (tmp_path / "im2.png").unlink()
    ds = CocoDetection(path, tmp_path, policy=RecordPolicy(missing_image="drop"))
    assert len(ds) == 1 and ds.report.counts["missing_image"] == 1


def test_unknown_category(tmp_path):
    path = write_coco(tmp_path, [image(1)], [ann(1, 1, 99, [1, 1, 5, 5]), ann(2, 1, 7, [1, 1, 5, 5])])
    with pytest.raises(UserError, match=r"annotations\[0\] \(id 1\): category_id 99 is not in 'categories'"):
        CocoDetection(path, tmp_path)
    ds = CocoDetection(path, tmp_path, policy=RecordPolicy(unknown_category="drop"))
    assert ds.report.counts["unknown_category"] == 1 and len(ds.records[0].labels) == 1


def test_degenerate_and_outside_boxes(tmp_path):
    anns = [ann(1, 1, 7, [1, 1, 0, 5]), ann(2, 1, 7, [1, 1, -3, 5]), ann(3, 1, 7, [30, 20, 20, 20]),
            ann(4, 1, 7, [50, 50, 5, 5]), ann(5, 1, 7, [2, 2, 5, 5])]
    path = write_coco(tmp_path, [image(1)], anns)
    ds = CocoDetection(path, tmp_path)  # defaults: drop degenerate, clip outside
    assert ds.report.counts["degenerate_box"] == 2
    assert ds.report.counts["box_outside_image (clipped)"] == 2
    assert ds.report.counts["box_outside_image (nothing left after clipping)"] == 1
    assert ds.records[0].boxes.tolist() == [[30, 20, 40, 30], [2, 2, 7, 7]]
    with pytest.raises(UserError, match=r"annotations\[0\].*zero or negative size"):
        CocoDetection(path, tmp_path, policy=RecordPolicy(degenerate_box="error"))
    with pytest.raises(UserError, match=r"annotations\[2\].*outside the 40x30 image"):
        CocoDetection(path, tmp_path, policy=RecordPolicy(box_outside_image="error"))


def test_bad_records_through_cli_exit_2(tmp_path, capsys):
    folder = tmp_path / "d"
    path = write_coco(folder, [image(1)], [ann(1, 1, 99, [1, 1, 5, 5])])
    raw = tiny_dict(tmp_path)
    raw["data"] = {"train": {"ann_file": str(path), "img_dir": str(folder)},
                   "val": {"ann_file": str(path), "img_dir": str(folder)}, "num_workers": 0}
    code = train_main(["--config", str(write_yaml(tmp_path / "c.yaml", raw)), "--preflight"])
    err = capsys.readouterr().err
    assert code == 2 and "ann.json" in err and "category_id 99" in err and "Traceback" not in err


def test_resize_and_flip_boxes_hand_computed():
    assert resize_scale(30, 40, 60, 100) == 2.0
    assert resize_scale(30, 90, 60, 100) == pytest.approx(100 / 90)  # long side capped
    boxes = torch.tensor([[2.0, 3.0, 12.0, 8.0]])
    assert hflip_boxes(boxes, 40).tolist() == [[28.0, 3.0, 38.0, 8.0]]
    transform = build_transforms(60, 100, hflip_prob=1.0, train=True)
    img = Image.new("RGB", (40, 30))
    out, target = transform(img, {"boxes": boxes}, np.random.default_rng(0))
    assert out.shape == (3, 60, 80)
    assert target["boxes"].tolist() == [[80 - 24.0, 6.0, 80 - 4.0, 16.0]]


def test_synthetic_is_deterministic(tmp_path):
    a = ensure_synthetic_dataset(5, 2, 48, seed=11, cache_dir=tmp_path / "a")
    b = ensure_synthetic_dataset(5, 2, 48, seed=11, cache_dir=tmp_path / "b")
    c = ensure_synthetic_dataset(5, 2, 48, seed=12, cache_dir=tmp_path / "c")
    digest = lambda folder: hashlib.sha1(b"".join(p.read_bytes() for p in sorted(folder.rglob("*.png")))
                                         + (folder / "train.json").read_bytes()).hexdigest()
    assert digest(a) == digest(b) != digest(c)
    data = json.loads((a / "train.json").read_text())
    assert len(data["images"]) == 5 and {c["name"] for c in data["categories"]} == {"square", "circle", "triangle", "cross"}


def test_truncated_image_in_worker_is_a_clean_error(tmp_path, capsys):
    folder = tmp_path / "d"
    # 20 images, the bad one last: the preflight decodes only the first 16 in this process,
    # so the failure happens inside a DataLoader worker
    path = write_coco(folder, [image(i, 64, 64) for i in range(1, 21)],
                      [ann(i, i, 7, [5, 5, 20, 20]) for i in range(1, 21)])
    png = folder / "im20.png"
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(png)
    png.write_bytes(png.read_bytes()[:400])  # header intact, pixel data cut
    raw = tiny_dict(tmp_path, solver={"max_iters": 12})
    raw["data"] = {"train": {"ann_file": str(path), "img_dir": str(folder)},
                   "val": {"ann_file": str(path), "img_dir": str(folder)}, "num_workers": 2,
                   "batch_size": 2, "min_size": 64, "max_size": 64}
    raw["model"]["num_classes"] = 2
    code = train_main(["--config", str(write_yaml(tmp_path / "c.yaml", raw)), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "im20.png" in err and "could not be read" in err
    assert "Traceback" not in err and "DataLoader worker" not in err


def test_repeat_factors_follow_the_rarest_class():
    from rcnn_trainer.data.repeat_factors import repeat_factors

    labels = [np.array([1]), np.array([1, 1]), np.array([1]), np.array([1, 2]), np.array([], dtype=np.int64)]
    # class 1 in 4 of 5 images: sqrt(0.5 / 0.8) < 1 -> 1; class 2 in 1 of 5: sqrt(0.5 / 0.2)
    factors = repeat_factors(labels, threshold=0.5)
    assert factors[:3] == [1.0, 1.0, 1.0] and factors[4] == 1.0
    assert abs(factors[3] - (0.5 / 0.2) ** 0.5) < 1e-9


def test_drawn_object_counts_weigh_each_image_by_its_repeat_factor():
    from rcnn_trainer.data.repeat_factors import drawn_object_counts, repeat_factors

    labels = [np.array([1]), np.array([1, 1]), np.array([1]), np.array([1, 2]), np.array([], dtype=np.int64)]
    assert drawn_object_counts(labels, 3, None) == [5.0, 1.0, 0.0]
    rare = repeat_factors(labels, 0.5)[3]
    assert drawn_object_counts(labels, 3, 0.5) == pytest.approx([4.0 + rare, rare, 0.0])


def test_repeat_factor_sampling_draws_rare_images_more_and_varies_their_augmentation():
    from rcnn_trainer.data.loader import TrainBatchSampler

    factors = [1.0, 1.0, 1.0, 2.5]
    sampler = TrainBatchSampler([1.0] * 4, 2, seed=0, group_by_aspect=False, repeat_factors=factors)
    epochs = [sampler.epoch_draws(e) for e in range(400)]
    per_epoch = [sum(1 for index, *_ in draws if index == 3) for draws in epochs]
    assert set(per_epoch) == {2, 3} and abs(sum(per_epoch) / len(per_epoch) - 2.5) < 0.1
    assert all(sum(1 for index, *_ in draws if index == 0) == 1 for draws in epochs)
    # each repeat is its own draw: distinct copy numbers, so distinct augmentation seeds
    assert all(len({d for d in draws if d[0] == 3}) == count for draws, count in zip(epochs, per_epoch))
    # a function of (seed, epoch): a resumed run draws the same
    again = TrainBatchSampler([1.0] * 4, 2, seed=0, group_by_aspect=False, repeat_factors=factors)
    assert [again.epoch_draws(e) for e in range(5)] == epochs[:5]
    # without repeat factors: each image once per epoch, in the order earlier versions drew
    plain = TrainBatchSampler([1.0] * 4, 2, seed=0, group_by_aspect=False)
    assert [d[0] for d in plain.epoch_draws(3)] == torch.randperm(4, generator=torch.Generator().manual_seed(3)).tolist()


def test_repeated_copies_get_their_own_flip(tmp_path):
    ann_file = write_coco(tmp_path, [image(1, 64, 48)], [ann(1, 1, 7, [2, 4, 10, 12])])
    dataset = CocoDetection(ann_file, tmp_path, transforms=build_transforms(48, 64, 0.5, train=True))
    boxes = {tuple(dataset[(0, 0, copy)][1]["boxes"][0].tolist()) for copy in range(12)}
    assert len(boxes) == 2  # flipped and not, over the copies of one epoch
    assert dataset[(0, 0, 0)][1]["boxes"].tolist() == dataset[(0, 0)][1]["boxes"].tolist()


def test_train_loader_with_repeat_factors(tmp_path):
    from rcnn_trainer.data.loader import build_train_loader

    images = [image(i, 64, 48) for i in range(1, 5)]
    anns = [ann(i, i, 7, [2, 4, 10, 12]) for i in range(1, 4)] + [ann(4, 4, 3, [2, 4, 10, 12])]
    split = {"ann_file": str(write_coco(tmp_path, images, anns)), "img_dir": str(tmp_path)}
    raw = tiny_dict(tmp_path, data={"train": split, "val": split, "batch_size": 2, "num_workers": 0,
                                    "repeat_factor_threshold": 0.5})
    raw["data"].pop("synthetic")
    cfg = validate_config(raw, source="test")
    loader = build_train_loader(cfg, CocoDetection(split["ann_file"], tmp_path))
    assert loader.batch_sampler.repeat_factors == [1.0, 1.0, 1.0, 2 ** 0.5]  # 'b' is in 1 of 4 images
    images_, targets = next(iter(loader))
    assert len(images_) == 2 and all(t["boxes"].shape == (1, 4) for t in targets)


def _png_header_only(path, width, height):
    """A PNG of a few bytes whose header claims width x height (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("check_images", ["all", 0])
def test_decompression_bomb_and_lying_header_are_refused_naming_the_record(tmp_path, check_images):
    path = write_coco(tmp_path, [image(1), image(2), image(3)], [ann(1, 1, 7, [1, 1, 5, 5])])
    _png_header_only(tmp_path / "im2.png", 30000, 30000)  # a bomb: 900 M pixels declared in ~100 bytes
    _png_header_only(tmp_path / "im3.png", 4000, 3000)  # the header says 4000x3000, the file says 40x30
    assert (tmp_path / "im2.png").stat().st_size < 1000
    if check_images == "all":  # checked at indexing
        with pytest.raises(UserError, match=r"image id 2 .*im2.png.*too large to decode safely"):
            CocoDetection(path, tmp_path, check_images="all")
        ds = CocoDetection(path, tmp_path, policy=RecordPolicy(missing_image="drop"), check_images="all")
        assert len(ds) == 1 and ds.report.counts["missing_image"] == 2
        assert any("im3.png" in e for e in ds.report.examples["missing_image"])
    else:  # not read at indexing: refused when first loaded, with the same message
        ds = CocoDetection(path, tmp_path, check_images=0)
        assert len(ds) == 3
        ds[0]
        with pytest.raises(UserError, match=r"image id 2 .*im2.png.*too large to decode safely"):
            ds[1]
        with pytest.raises(UserError, match=r"image id 3 .*im3.png.*4000x3000 but the annotation says 40x30"):
            ds[2]
        dropping = CocoDetection(path, tmp_path, check_images=0, policy=RecordPolicy(missing_image="drop"))
        _, target = dropping[1]  # dropped at load: the next good image comes instead (3 is bad too), counted
        assert dropping.report.counts["missing_image"] == 2 and target["image_id"] == 1


def test_vectorized_index_equals_the_per_record_checks(tmp_path):
    # the fast path and the per-record path must build identical records on a file with every kind of box
    images = [image(i, 50, 40) for i in range(1, 5)]
    boxes = [[1, 1, 5, 5], [45, 35, 10, 10], [-3, 2, 6, 6], [0, 0, 0, 4], [49.5, 1, 3, 3], [60, 60, 5, 5],
             [2, 2, 3.5, 7.25], [-0.5, -0.5, 10, 10]]
    anns = [ann(k + 1, 1 + k % 4, (7, 3)[k % 2], b) for k, b in enumerate(boxes * 3)]
    anns[5]["iscrowd"] = 1
    path = write_coco(tmp_path, images, anns)
    fast = CocoDetection(path, tmp_path)
    slow_file = write_coco(tmp_path, images, anns + [{"id": 99, "image_id": 1, "category_id": 7, "bbox": [1, 1, 2, 2],
                                                      "note": {"nested": True}}], name="slow.json", make_files=False)
    import rcnn_trainer.data.coco_index as coco_module
    original = coco_module._annotation_columns
    coco_module._annotation_columns = lambda anns: None  # force the per-record path
    try:
        slow = CocoDetection(slow_file, tmp_path)
    finally:
        coco_module._annotation_columns = original
    assert [r.image_id for r in fast.records] == [r.image_id for r in slow.records]
    for a, b in zip(fast.records, slow.records):
        extra = 1 if a.image_id == 1 else 0
        assert np.allclose(a.boxes, b.boxes[:len(b.boxes) - extra]) and (a.labels == b.labels[:len(b.labels) - extra]).all()
        assert a.num_crowd == b.num_crowd
    assert fast.report.counts == slow.report.counts


def test_record_policy_defaults_follow_the_config():
    import dataclasses

    from rcnn_trainer.config import BadRecordPolicy
    from rcnn_trainer.data.records import RecordPolicy

    assert dataclasses.asdict(RecordPolicy()) == BadRecordPolicy().model_dump()
