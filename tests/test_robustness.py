"""Bad input never hangs: datasets and files a user really has. Every case ends, within a time
limit, in its expected outcome: it trains, it drops records with a counted warning, or it exits
2 with a message naming the file, record or key. Never a traceback, never a hang, never a
corrupt file."""

from __future__ import annotations

import json
import math
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, ann, tiny_dict, write_yaml
from rcnn_trainer.cli import train_main
from rcnn_trainer.runtime import checkpoint as ckpt_io

LIMIT_S = 120
TINY_LR = TINY["solver"]["lr"]


@contextmanager
def time_limit(seconds: int = LIMIT_S):
    """A hang fails the test instead of stalling CI."""
    def on_alarm(*_):
        raise TimeoutError(f"no result within {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def save(folder: Path, name: str, array: np.ndarray, mode: str | None = None, **kw) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    img.save(folder / name, **kw)
    return {"file_name": name, "width": img.width, "height": img.height}


def rgb(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def dataset(folder: Path, images: list[dict], annotations: list[dict], categories=None, name="ann.json",
            **extra) -> Path:
    for i, image in enumerate(images):
        image.setdefault("id", i + 1)
    data = {"images": images, "annotations": annotations,
            "categories": categories if categories is not None else [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            **extra}
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def standard_images(folder: Path, count: int = 4, w: int = 64, h: int = 48) -> tuple[list, list]:
    images = [dict(save(folder, f"s{i}.png", rgb(w, h, i)), id=i + 1) for i in range(count)]
    annotations = [ann(i + 1, i + 1, 1 + i % 2, [5, 5, 20, 16]) for i in range(count)]
    return images, annotations


def coco_dict(tmp_path: Path, train_file: Path, val_file: Path | None = None, img_dir: Path | None = None,
              **updates) -> dict:
    """The tiny config on these COCO files instead of the synthetic data (val: the train file)."""
    img_dir = img_dir or train_file.parent
    raw = tiny_dict(tmp_path, **updates)
    raw["data"].pop("synthetic")
    raw["data"]["train"] = {"ann_file": str(train_file), "img_dir": str(img_dir)}
    raw["data"]["val"] = {"ann_file": str(val_file or train_file), "img_dir": str(img_dir)}
    raw["model"]["num_classes"] = "auto"
    return raw


def run_train(tmp_path: Path, train_file: Path, val_file: Path | None = None, *overrides: str,
              img_dir: Path | None = None, output: Path | None = None, **updates) -> int:
    raw = coco_dict(tmp_path, train_file, val_file, img_dir, **updates)
    raw["solver"]["max_iters"] = 2
    if output is not None:
        raw["output_dir"] = str(output)
    config = write_yaml(tmp_path / "c.yaml", raw)
    with time_limit():
        return train_main(["--config", str(config), "--no-progress", *overrides])


def train_lines(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if json.loads(l)["type"] == "train"]


def assert_clean_error(capsys, *needles: str) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    for needle in needles:
        assert needle in captured.err, (needle, captured.err[-2000:])
    return captured.err


# ------------------------------------------------------------------ dataset size and shape
@pytest.mark.parametrize("count, batch", [(3, 8), (1, 4)])
def test_fewer_images_than_the_batch_trains(tmp_path, count, batch):
    images, annotations = standard_images(tmp_path / "d", count)
    assert run_train(tmp_path, dataset(tmp_path / "d", images, annotations), data={"batch_size": batch}) == 0
    # full batches all the same: the few images repeat within each (one object each)
    lines = train_lines(tmp_path / "run")
    assert [l["iter"] for l in lines] == [1, 2]
    assert all(l["images"] == batch and l["gt_per_image"] == 1.0 for l in lines), lines
    assert ckpt_io.load_checkpoint(tmp_path / "run" / "model_final.pth")["iteration"] == 2


def test_every_aspect_group_smaller_than_the_batch_trains(tmp_path):
    folder = tmp_path / "d"
    images = [dict(save(folder, f"l{i}.png", rgb(64, 40, i)), id=i + 1) for i in range(2)]
    images += [dict(save(folder, f"p{i}.png", rgb(40, 64, i)), id=i + 3) for i in range(2)]
    annotations = [ann(i + 1, i + 1, 1, [4, 4, 16, 16]) for i in range(4)]
    assert run_train(tmp_path, dataset(folder, images, annotations), data={"batch_size": 4}) == 0
    assert [(l["iter"], l["images"]) for l in train_lines(tmp_path / "run")] == [(1, 4.0), (2, 4.0)]
    # each batch: one orientation only, its two images repeated to fill it
    from rcnn_trainer.data.loader import TrainBatchSampler

    sampler = iter(TrainBatchSampler([64 / 40, 64 / 40, 40 / 64, 40 / 64], 4, seed=1, group_by_aspect=True))
    for _ in range(4):
        indices = [draw[0] for draw in next(sampler)]
        assert len(indices) == 4 and set(indices) in ({0, 1}, {2, 3}), indices


def test_val_set_without_objects_trains_and_evaluates(tmp_path):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    val = dataset(folder, [dict(i) for i in images], [], name="val.json")
    assert run_train(tmp_path, dataset(folder, images, annotations), val) == 0
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluation = [l for l in lines if l["type"] == "eval"][-1]
    # pycocotools' "no ground truth" value, not a crash or a made-up 0; detections still counted
    assert evaluation["AP"] == -1.0 and evaluation["AP50"] == -1.0 and evaluation["gt_per_image"] == 0.0
    assert evaluation["dets@0.05"] >= 0.0 and lines[-1]["type"] == "summary" and lines[-1]["AP"] == -1.0


# ------------------------------------------------------------------ image files
def unusual_image(folder: Path, kind: str) -> tuple[dict, np.ndarray]:
    """(image record, the RGB pixels the model must see) for one kind of file a user has."""
    source = rgb(64, 48)
    if kind == "grayscale":
        return save(folder, f"{kind}.png", source[:, :, 0], "L"), np.repeat(source[:, :, :1], 3, axis=2)
    if kind == "rgba":  # alpha dropped, no matte
        alpha = np.full((48, 64), 128, np.uint8)
        return save(folder, f"{kind}.png", np.dstack([source, alpha]), "RGBA"), source
    if kind == "palette":  # PIL's quantization of the source: close to it, not equal
        folder.mkdir(parents=True, exist_ok=True)
        quantized = Image.fromarray(source).convert("P")
        quantized.save(folder / f"{kind}.png")
        return {"file_name": f"{kind}.png", "width": 64, "height": 48}, np.asarray(quantized.convert("RGB"))
    if kind == "16bit":  # scaled to 8 bits (v / 257), not clipped at 255
        values = np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return save(folder, f"{kind}.png", values), np.repeat(grey[:, :, None], 3, axis=2)
    if kind == "exif_rotated_jpeg":  # read as stored (as pycocotools does): 64 x 48, not turned
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display"
        y, x = np.mgrid[0:48, 0:64]
        smooth = np.dstack([x * 4, y * 5, (x + y) * 2]).astype(np.uint8)  # JPEG keeps smooth content close
        return save(folder, f"{kind}.jpg", smooth, exif=exif.tobytes(), quality=95), smooth
    size = {"1x1": (1, 1), "4000_wide": (4000, 60), "20_to_1": (400, 20)}[kind]
    pixels = rgb(*size)
    return save(folder, f"{kind}.png", pixels), pixels


UNUSUAL = ["grayscale", "rgba", "palette", "16bit", "exif_rotated_jpeg", "1x1", "4000_wide", "20_to_1"]


@pytest.mark.parametrize("kind", UNUSUAL)
def test_unusual_image_files_become_the_documented_pixels(tmp_path, kind):
    from rcnn_trainer.data.pixels import to_rgb

    record, expected = unusual_image(tmp_path, kind)
    with Image.open(tmp_path / record["file_name"]) as img:
        pixels = np.asarray(to_rgb(img))
    assert pixels.shape == expected.shape and pixels.dtype == np.uint8
    tolerance = 3.0 if kind == "exif_rotated_jpeg" else 0.0  # JPEG is lossy
    assert np.abs(pixels.astype(float) - expected).mean() <= tolerance, kind
    if kind == "palette":
        assert np.abs(pixels.astype(float) - rgb(64, 48)).mean() < 20  # the colours survive quantization
    if kind == "16bit":
        assert (pixels == 255).mean() < 0.01  # PIL's own convert made 99.6% of these pixels white


def test_unusual_images_load_resized_and_train_together(tmp_path):
    """Every kind in one dataset: each item comes out as 3 x H x W within min/max size with its
    box scaled alike, and a training run over them finishes."""
    from rcnn_trainer.config_loader import validate_config
    from rcnn_trainer.data.loader import build_dataset

    folder = tmp_path / "d"
    images, annotations = standard_images(folder, 3)
    for k, kind in enumerate(UNUSUAL):
        record, _ = unusual_image(folder, kind)
        images.append(dict(record, id=100 + k))
        box = [0, 0, min(record["width"], 30), min(record["height"], 30)]
        if min(box[2:]) >= 2:
            annotations.append(ann(100 + k, 100 + k, 2, box))
    train_file = dataset(folder, images, annotations)
    raw = coco_dict(tmp_path, train_file, data={"hflip_prob": 0.0})
    data = validate_config(raw, "test").data
    train_set = build_dataset(validate_config(raw, "test"), "train")
    for index, record in enumerate(train_set.records):
        image, target = train_set[index]
        assert image.shape[0] == 3 and image.dtype == torch.float32 and 0.0 <= image.min() <= image.max() <= 1.0
        scale = min(data.min_size / min(record.height, record.width), data.max_size / max(record.height, record.width))
        assert image.shape[1:] == (round(record.height * scale), round(record.width * scale)), record.path
        torch.testing.assert_close(target["boxes"], torch.from_numpy(record.boxes) * scale, atol=0.6, rtol=0)
    assert run_train(tmp_path, train_file, data={"batch_size": 4}) == 0
    lines = train_lines(tmp_path / "run")
    assert [(l["iter"], l["images"]) for l in lines] == [(1, 4.0), (2, 4.0)] and all(math.isfinite(l["loss"]) for l in lines)


def test_non_finite_box_dropped_with_a_count_when_asked(tmp_path, capsys):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    annotations.append({"id": 77, "image_id": 1, "category_id": 1, "bbox": [1, 2, float("nan"), 4], "iscrowd": 0})
    assert run_train(tmp_path, dataset(folder, images, annotations)) == 2
    assert_clean_error(capsys, "ann.json", "id 77", "non-finite", "data.bad_records.non_finite_box")
    assert run_train(tmp_path, dataset(folder, images, annotations), None, "data.bad_records.non_finite_box=drop",
                     "--output-dir", str(tmp_path / "run2")) == 0
    assert "non_finite_box: 1" in capsys.readouterr().out


def test_category_id_0_declared_trains(tmp_path):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    for a in annotations:
        a["category_id"] = 0 if a["category_id"] == 1 else 5
    categories = [{"id": 0, "name": "zero"}, {"id": 5, "name": "five"}]
    train_file = dataset(folder, images, annotations, categories)
    assert run_train(tmp_path, train_file) == 0
    # id 0 is a class like any other (label 1, not the background's 0), and maps back to id 0
    from rcnn_trainer.data.coco import CocoDetection

    loaded = CocoDetection(train_file, folder)
    by_id = {r.image_id: r.labels.tolist() for r in loaded.records}
    assert by_id == {1: [1], 2: [2], 3: [1], 4: [2]}  # standard_images: category 0 on images 1 and 3
    ckpt = ckpt_io.load_checkpoint(tmp_path / "run" / "model_final.pth")
    assert {int(k): int(v) for k, v in ckpt["label_to_cat_id"].items()} == {1: 0, 2: 5}
    assert list(ckpt["class_names"]) == ["zero", "five"]
    evaluation = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                  if json.loads(l)["type"] == "eval"][-1]
    assert "AP/zero" in evaluation and "AP/five" in evaluation


def test_duplicate_and_missing_annotation_ids_still_evaluate_every_box(tmp_path, capsys):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    annotations[1]["id"] = annotations[0]["id"]
    del annotations[2]["id"]
    assert run_train(tmp_path, dataset(folder, images, annotations)) == 0
    assert "annotation ids renumbered for evaluation" in capsys.readouterr().out


def test_crowd_only_images_are_negatives(tmp_path):
    """An image whose only box is a crowd box stays in training with no target box (a
    negative); the crowd box is kept for COCO evaluation, which ignores detections on it."""
    from rcnn_trainer.data.coco import CocoDetection

    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    annotations[0]["iscrowd"] = 1
    loaded = CocoDetection(dataset(folder, images, annotations), folder)
    by_id = {r.image_id: r for r in loaded.records}
    assert sorted(by_id) == [1, 2, 3, 4] and len(by_id[1].boxes) == 0
    assert all(len(by_id[i].boxes) == 1 for i in (2, 3, 4))
    assert [a["iscrowd"] for a in loaded.raw["annotations"] if a["image_id"] == 1] == [1]


def test_500_objects_in_one_image_trains(tmp_path):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder, 2, 256, 256)
    for k in range(500):
        x, y = (k % 25) * 10, (k // 25) * 12
        annotations.append(ann(1000 + k, 1, 1 + k % 2, [x, y, 8, 10]))
    assert run_train(tmp_path, dataset(folder, images, annotations), data={"min_size": 128, "max_size": 128}) == 0
    lines = train_lines(tmp_path / "run")  # every object trained on: (501 + 1) / 2 per image, both steps
    assert [l["iter"] for l in lines] == [1, 2] and all(l["gt_per_image"] == 251.0 for l in lines), lines
    assert all(math.isfinite(l["loss"]) for l in lines)


def test_segmentation_only_records_get_their_box_from_the_polygon(tmp_path, capsys):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    annotations.append({"id": 50, "image_id": 2, "category_id": 2, "iscrowd": 0,
                        "segmentation": [[10, 10, 40, 10, 40, 30, 10, 30]]})
    train_file = dataset(folder, images, annotations)
    assert run_train(tmp_path, train_file) == 0
    assert "bbox derived from segmentation" in capsys.readouterr().out
    from rcnn_trainer.data.coco import CocoDetection

    record = next(r for r in CocoDetection(train_file, folder).records if r.image_id == 2)
    assert record.boxes.tolist() == [[5.0, 5.0, 25.0, 21.0], [10.0, 10.0, 40.0, 30.0]]  # its own box, then the polygon's


# ------------------------------------------------------------------ data that must stop a run (exit 2)
def _truncated(folder: Path):
    images, annotations = standard_images(folder)
    data = (folder / "s0.png").read_bytes()
    (folder / "s0.png").write_bytes(data[: len(data) // 2])
    return dataset(folder, images, annotations), None, {}


def _size_differs(folder: Path):
    images, annotations = standard_images(folder)
    images[1]["width"] = 100
    return dataset(folder, images, annotations), None, {}


def _bad_bbox(bbox):
    def build(folder: Path):
        images, annotations = standard_images(folder)
        annotations.append({"id": 77, "image_id": 1, "category_id": 1, "bbox": bbox, "iscrowd": 0})
        return dataset(folder, images, annotations), None, {}
    return build


def _edit(change):
    def build(folder: Path):
        images, annotations = standard_images(folder)
        change(images, annotations)
        return dataset(folder, images, annotations), None, {}
    return build


def _no_categories(folder: Path):
    images, annotations = standard_images(folder)
    path = folder / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path, None, {}


def _val_empty_after_drops(folder: Path):
    images, annotations = standard_images(folder)
    val = dataset(folder, [{"id": 1, "file_name": "gone.png", "width": 64, "height": 48}], [], name="val.json")
    return dataset(folder, images, annotations), val, {"bad_records": {"missing_image": "drop"}}


def _all_crowd(images, annotations):
    for a in annotations:
        a["iscrowd"] = 1


BAD_DATA = {  # case: (builder -> (train file, val file or None, data.* updates), what the message names)
    "truncated_image": (_truncated, ["s0.png", "could not be read"]),
    "size_differs_from_json": (_size_differs, ["s1.png", "is 64x48 but the annotation says 100x48"]),
    "bbox_nan": (_bad_bbox([1, 2, float("nan"), 4]), ["ann.json", "id 77", "non-finite"]),
    "bbox_inf": (_bad_bbox([1, float("inf"), 3, 4]), ["ann.json", "id 77", "non-finite"]),
    "bbox_strings": (_bad_bbox(["1", "2", "3", "4"]), ["ann.json", "id 77", "bbox must be 4 numbers"]),
    "bbox_3_numbers": (_bad_bbox([1, 2, 3]), ["ann.json", "id 77", "bbox must be 4 numbers"]),
    "category_id_0_undeclared": (_edit(lambda i, a: a[0].update(category_id=0)),
                                 ["category_id 0 is not in 'categories'", "unknown_category: drop"]),
    "duplicate_image_ids": (_edit(lambda i, a: i[2].update(id=i[1]["id"])), ["duplicate image id 2"]),
    "all_crowd": (_edit(_all_crowd), ["4 images loaded from", "ann.json', 0 objects (4 annotations in the file"]),
    "no_categories_key": (_no_categories, ["ann.json", "'categories'"]),
    "val_empty_after_drops": (_val_empty_after_drops, ["val.json", "no image left"]),
}


def checked_data(tmp_path: Path, train_file: Path, val_file: Path | None, data_updates: dict):
    """What rcnn-train does with the data before it builds a model: index both splits, resolve
    the auto settings, run the preflight, then load every training image once."""
    from rcnn_trainer.config_loader import validate_config
    from rcnn_trainer.train.metrics_log import MetricsLog
    from rcnn_trainer.train.run_setup import prepare_checked_data

    cfg = validate_config(coco_dict(tmp_path, train_file, val_file, data=data_updates), "test")
    with time_limit():
        _, train_set, _, _ = prepare_checked_data(cfg, lambda _: None, 1, MetricsLog(tmp_path / "m.jsonl"))
        for index in range(len(train_set)):
            train_set[index]


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_refused_naming_the_file_and_record(tmp_path, case):
    from rcnn_trainer.errors import UserError

    build, needles = BAD_DATA[case]
    with pytest.raises(UserError) as refused:
        checked_data(tmp_path, *build(tmp_path / "d"))
    for needle in needles:
        assert needle in str(refused.value), (needle, str(refused.value)[-1500:])


def test_bad_data_exits_2_with_a_message_and_no_traceback(tmp_path, capsys):
    """The CLI end of the cases above, once: exit 2, the message on stderr, nothing written."""
    train_file, _, _ = _edit(lambda i, a: i[2].update(id=i[1]["id"]))(tmp_path / "d")
    assert run_train(tmp_path, train_file) == 2
    assert_clean_error(capsys, "duplicate image id 2")
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------ configs and the file system
def test_more_workers_than_cores_gives_the_same_batches(tmp_path):
    """64 loader workers on 2 cores: the same seeded batches, in the same order, as loading in
    the main process (augmentation is seeded per image, not per worker)."""
    from rcnn_trainer.config_loader import validate_config
    from rcnn_trainer.data.loader import build_dataset, build_train_loader

    images, annotations = standard_images(tmp_path / "d", 8)
    train_file = dataset(tmp_path / "d", images, annotations)
    raw = coco_dict(tmp_path, train_file, data={"hflip_prob": 0.5})
    batches = {}
    for workers in (0, 64):
        raw["data"]["num_workers"] = workers
        cfg = validate_config(raw, "test")
        with time_limit():
            it = iter(build_train_loader(cfg, build_dataset(cfg, "train")))
            batches[workers] = [next(it) for _ in range(6)]
    for (images_a, targets_a), (images_b, targets_b) in zip(batches[0], batches[64]):
        assert [t["image_id"] for t in targets_a] == [t["image_id"] for t in targets_b]
        for a, b in zip(images_a, images_b):
            assert torch.equal(a, b)


def test_max_iters_below_warmup_and_checkpoint_period_above_max_iters(tmp_path):
    images, annotations = standard_images(tmp_path / "d")
    code = run_train(tmp_path, dataset(tmp_path / "d", images, annotations), None, "solver.warmup_iters=50",
                     "train.checkpoint_period=1000")
    assert code == 0 and (tmp_path / "run" / "model_final.pth").is_file()
    latest, _ = ckpt_io.load_latest(tmp_path / "run" / "checkpoints", log=print)
    assert latest["iteration"] == 2  # the last iteration is saved though the period is never reached
    lrs = [l["lr"] for l in train_lines(tmp_path / "run")]
    assert lrs == sorted(lrs) and lrs[-1] < 0.1 * TINY_LR  # still warming up when the run ends


def test_output_dir_that_cannot_be_created_is_exit_2(tmp_path, capsys):
    images, annotations = standard_images(tmp_path / "d")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = run_train(tmp_path, dataset(tmp_path / "d", images, annotations), output=blocker / "run")
    assert code == 2
    assert_clean_error(capsys, str(blocker / "run"))


def test_output_dir_with_spaces_and_non_ascii_trains(tmp_path):
    images, annotations = standard_images(tmp_path / "d")
    out = tmp_path / "my runs" / "éxpérience 実験"
    assert run_train(tmp_path, dataset(tmp_path / "d", images, annotations), output=out) == 0
    assert ckpt_io.load_checkpoint(out / "model_final.pth")["iteration"] == 2
    assert [l["iter"] for l in train_lines(out)] == [1, 2]


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    images, annotations = standard_images(tmp_path / "d")
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:  # the first checkpoint lands, the second finds the disk full
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    code = run_train(tmp_path, dataset(tmp_path / "d", images, annotations), None, "solver.max_iters=4",
                     "train.checkpoint_period=2")
    monkeypatch.setattr(torch, "save", real_save)
    assert code == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt_dir.iterdir()] == ["ckpt_0000002.pth"]  # no partial file left
    ckpt, _ = ckpt_io.load_latest(ckpt_dir, log=print)
    assert ckpt["iteration"] == 2


def test_data_watchdog_stops_a_stalled_worker_and_keeps_progress(tmp_path, capsys, monkeypatch):
    """A loader worker that stalls (network storage gone) ends the run within the watchdog's
    time, saying where it waited, after a checkpoint of the progress so far."""
    import time as _time

    from rcnn_trainer.data.coco import CocoDetection

    images, annotations = standard_images(tmp_path / "d", 4)
    real_getitem = CocoDetection.__getitem__

    def stall_after_first_epoch(self, key):
        index, epoch = key[:2] if isinstance(key, tuple) else (key, 0)
        if epoch >= 1:
            _time.sleep(60)
        return real_getitem(self, key)

    monkeypatch.setattr(CocoDetection, "__getitem__", stall_after_first_epoch)  # workers fork with it
    code = run_train(tmp_path, dataset(tmp_path / "d", images, annotations), None, "solver.max_iters=6",
                     "train.data_timeout_s=3", data={"num_workers": 1, "batch_size": 2})
    assert code == 1
    err = assert_clean_error(capsys, "no training batch arrived within train.data_timeout_s=3 s")
    assert "--resume" in err
    ckpt, _ = ckpt_io.load_latest(tmp_path / "run" / "checkpoints", log=print)
    assert ckpt["iteration"] == 2  # two batches of the first epoch trained and saved
