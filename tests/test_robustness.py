"""Bad input never hangs: datasets and files a user really has. Every case ends, within a time
limit, in its expected outcome: it trains, it drops records with a counted warning, or it exits
2 with a message naming the file, record or key. Never a traceback, never a hang, never a
corrupt file."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ann, tiny_dict, write_yaml
from rcnn_trainer.cli import train_main
from rcnn_trainer.engine import checkpoint as ckpt_io

LIMIT_S = 120


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


def run_train(tmp_path: Path, train_file: Path, val_file: Path | None = None, *overrides: str,
              img_dir: Path | None = None, output: Path | None = None, **updates) -> int:
    img_dir = img_dir or train_file.parent
    val_file = val_file or train_file
    raw = tiny_dict(tmp_path, **updates)
    raw["data"].pop("synthetic")
    raw["data"]["train"] = {"ann_file": str(train_file), "img_dir": str(img_dir)}
    raw["data"]["val"] = {"ann_file": str(val_file), "img_dir": str(img_dir)}
    raw["model"]["num_classes"] = "auto"
    raw["solver"]["max_iters"] = 2
    if output is not None:
        raw["output_dir"] = str(output)
    config = write_yaml(tmp_path / "c.yaml", raw)
    with time_limit():
        return train_main(["--config", str(config), "--no-progress", *overrides])


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


def test_every_aspect_group_smaller_than_the_batch_trains(tmp_path):
    folder = tmp_path / "d"
    images = [dict(save(folder, f"l{i}.png", rgb(64, 40, i)), id=i + 1) for i in range(2)]
    images += [dict(save(folder, f"p{i}.png", rgb(40, 64, i)), id=i + 3) for i in range(2)]
    annotations = [ann(i + 1, i + 1, 1, [4, 4, 16, 16]) for i in range(4)]
    assert run_train(tmp_path, dataset(folder, images, annotations), data={"batch_size": 4}) == 0


def test_val_set_without_objects_trains_and_evaluates(tmp_path):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    val = dataset(folder, [dict(i) for i in images], [], name="val.json")
    assert run_train(tmp_path, dataset(folder, images, annotations), val) == 0
    summary = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["type"] == "summary"


def test_val_split_empty_after_drops_is_exit_2(tmp_path, capsys):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    val = dataset(folder, [{"id": 1, "file_name": "gone.png", "width": 64, "height": 48}], [], name="val.json")
    code = run_train(tmp_path, dataset(folder, images, annotations), val, "data.bad_records.missing_image=drop")
    assert code == 2
    assert_clean_error(capsys, "val.json", "no image left")


# ------------------------------------------------------------------ image files
@pytest.mark.parametrize("kind", ["grayscale", "rgba", "palette", "16bit", "exif_rotated_jpeg", "1x1", "4000_wide",
                                  "20_to_1"])
def test_unusual_images_train(tmp_path, kind):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder, 3)
    if kind == "grayscale":
        extra = save(folder, "x.png", rgb(64, 48)[:, :, 0], "L")
    elif kind == "rgba":
        extra = save(folder, "x.png", np.dstack([rgb(64, 48), np.full((48, 64), 128, np.uint8)]), "RGBA")
    elif kind == "palette":
        folder.mkdir(exist_ok=True)
        Image.fromarray(rgb(64, 48)).convert("P").save(folder / "x.png")
        extra = {"file_name": "x.png", "width": 64, "height": 48}
    elif kind == "16bit":
        extra = save(folder, "x.png", (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20))
    elif kind == "exif_rotated_jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display": the stored pixels stay 64x48
        extra = save(folder, "x.jpg", rgb(64, 48), exif=exif.tobytes())
    elif kind == "1x1":
        extra = save(folder, "x.png", rgb(1, 1))
    elif kind == "4000_wide":
        extra = save(folder, "x.png", rgb(4000, 60))
    else:
        extra = save(folder, "x.png", rgb(400, 20))
    images.append(dict(extra, id=99))
    box = [0, 0, min(extra["width"], 30), min(extra["height"], 30)]
    if min(box[2:]) >= 2:
        annotations.append(ann(99, 99, 2, box))
    assert run_train(tmp_path, dataset(folder, images, annotations), data={"batch_size": 4}) == 0


def test_truncated_image_is_exit_2_naming_it(tmp_path, capsys):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    data = (folder / "s0.png").read_bytes()
    (folder / "s0.png").write_bytes(data[: len(data) // 2])
    assert run_train(tmp_path, dataset(folder, images, annotations)) == 2
    assert_clean_error(capsys, "s0.png")


def test_image_size_differs_from_json_is_exit_2(tmp_path, capsys):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    images[1]["width"] = 100
    assert run_train(tmp_path, dataset(folder, images, annotations)) == 2
    assert_clean_error(capsys, "s1.png", "is 64x48 but the annotation says 100x48")


# ------------------------------------------------------------------ annotation records
@pytest.mark.parametrize("bbox, message", [
    ([1, 2, float("nan"), 4], "non-finite"), ([1, float("inf"), 3, 4], "non-finite"),
    (["1", "2", "3", "4"], "bbox must be 4 numbers"), ([1, 2, 3], "bbox must be 4 numbers")])
def test_bad_bbox_values_are_exit_2_naming_the_record(tmp_path, capsys, bbox, message):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    annotations.append({"id": 77, "image_id": 1, "category_id": 1, "bbox": bbox, "iscrowd": 0})
    assert run_train(tmp_path, dataset(folder, images, annotations)) == 2
    assert_clean_error(capsys, "ann.json", "id 77", message)


def test_non_finite_box_dropped_with_a_count_when_asked(tmp_path, capsys):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    annotations.append({"id": 77, "image_id": 1, "category_id": 1, "bbox": [1, 2, float("nan"), 4], "iscrowd": 0})
    assert run_train(tmp_path, dataset(folder, images, annotations)) == 2
    capsys.readouterr()
    assert run_train(tmp_path, dataset(folder, images, annotations), None, "data.bad_records.non_finite_box=drop",
                     "--output-dir", str(tmp_path / "run2")) == 0
    assert "non_finite_box: 1" in capsys.readouterr().out


def test_category_id_0_unknown_is_exit_2(tmp_path, capsys):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    annotations[0]["category_id"] = 0
    assert run_train(tmp_path, dataset(folder, images, annotations)) == 2
    assert_clean_error(capsys, "category_id 0 is not in 'categories'", "unknown_category: drop")


def test_category_id_0_declared_trains(tmp_path):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    for a in annotations:
        a["category_id"] = 0 if a["category_id"] == 1 else 5
    categories = [{"id": 0, "name": "zero"}, {"id": 5, "name": "five"}]
    assert run_train(tmp_path, dataset(folder, images, annotations, categories)) == 0


def test_duplicate_image_ids_are_exit_2(tmp_path, capsys):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    images[2]["id"] = images[1]["id"]
    assert run_train(tmp_path, dataset(folder, images, annotations)) == 2
    assert_clean_error(capsys, "duplicate image id 2")


def test_duplicate_and_missing_annotation_ids_still_evaluate_every_box(tmp_path, capsys):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    annotations[1]["id"] = annotations[0]["id"]
    del annotations[2]["id"]
    assert run_train(tmp_path, dataset(folder, images, annotations)) == 0
    assert "annotation ids renumbered for evaluation" in capsys.readouterr().out


def test_crowd_only_images_are_negatives(tmp_path):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    annotations[0]["iscrowd"] = 1
    assert run_train(tmp_path, dataset(folder, images, annotations)) == 0


def test_all_crowd_is_exit_2_zero_objects(tmp_path, capsys):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    for a in annotations:
        a["iscrowd"] = 1
    assert run_train(tmp_path, dataset(folder, images, annotations)) == 2
    assert_clean_error(capsys, "0")


def test_no_categories_key_is_exit_2(tmp_path, capsys):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    path = folder / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    assert run_train(tmp_path, path) == 2
    assert_clean_error(capsys, "ann.json", "'categories'")


def test_500_objects_in_one_image_trains(tmp_path):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder, 2, 256, 256)
    for k in range(500):
        x, y = (k % 25) * 10, (k // 25) * 12
        annotations.append(ann(1000 + k, 1, 1 + k % 2, [x, y, 8, 10]))
    assert run_train(tmp_path, dataset(folder, images, annotations), data={"min_size": 128, "max_size": 128}) == 0


def test_segmentation_only_records_get_their_box_from_the_polygon(tmp_path, capsys):
    folder = tmp_path / "d"
    images, annotations = standard_images(folder)
    annotations.append({"id": 50, "image_id": 2, "category_id": 2, "iscrowd": 0,
                        "segmentation": [[10, 10, 40, 10, 40, 30, 10, 30]]})
    assert run_train(tmp_path, dataset(folder, images, annotations)) == 0
    assert "bbox derived from segmentation" in capsys.readouterr().out


# ------------------------------------------------------------------ configs and the file system
def test_more_workers_than_cores_trains(tmp_path):
    images, annotations = standard_images(tmp_path / "d")
    assert run_train(tmp_path, dataset(tmp_path / "d", images, annotations), data={"num_workers": 64}) == 0


def test_max_iters_below_warmup_and_checkpoint_period_above_max_iters(tmp_path):
    images, annotations = standard_images(tmp_path / "d")
    code = run_train(tmp_path, dataset(tmp_path / "d", images, annotations), None, "solver.warmup_iters=50",
                     "train.checkpoint_period=1000")
    assert code == 0 and (tmp_path / "run" / "model_final.pth").is_file()
    assert ckpt_io.load_latest(tmp_path / "run" / "checkpoints", log=print) is not None


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
    assert (out / "model_final.pth").is_file()


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
