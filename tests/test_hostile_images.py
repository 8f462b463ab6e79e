"""Hostile images (issue 37): rcnn-predict skips what it cannot read and keeps what it did
(predictions.jsonl per batch), evaluation scores exactly the images it read when missing ones
are dropped, training's stand-in search is a bounded loop, and masks are rasterized at the
model's input size instead of the file's."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import image, tiny_dict, write_coco, write_yaml
from rcnn_trainer.cli import eval_main, predict_main
from rcnn_trainer.config_loader import config_to_dict, validate_config
from rcnn_trainer.data.coco import CocoDetection, RecordPolicy
from rcnn_trainer.data.loader import collate, resolve_splits
from rcnn_trainer.data.pixels import read_rgb
from rcnn_trainer.data.transforms import build_transforms, resize_masks
from rcnn_trainer.errors import UserError
from rcnn_trainer.model.build import build_model

GOOD = ("a.png", "b.jpg", "c.png", "deep16.png", "cmyk.jpg", "la.png", "one_bit.png", "palette_alpha.png",
        "float.tif", "int32.tif")
BAD = {"bomb.png": "too large to decode safely", "empty.png": "could not be read",
       "truncated.jpg": "could not be read"}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """(config, checkpoint) of the tiny model at its seeded initialization: these tests need a
    checkpoint rcnn-predict and rcnn-eval load, not a good one (conftest's `trained` trains 4 steps
    per module, ~10 s here)."""
    tmp = tmp_path_factory.mktemp("untrained")
    cfg = validate_config(tiny_dict(tmp), source="test")
    torch.manual_seed(0)
    checkpoint = tmp / "model_final.pth"
    torch.save({"model": build_model(cfg.model).state_dict(), "config": config_to_dict(cfg),
                "class_names": ["square", "circle", "triangle", "cross"],
                "label_to_cat_id": {label: label for label in range(1, 5)}}, checkpoint)
    return write_yaml(tmp / "c.yaml", tiny_dict(tmp)), checkpoint


def hostile_folder(folder):
    """The GOOD images (3 RGB, then unusual modes) and the BAD ones, tiny except the bomb's header."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in (("a.png", (90, 70)), ("b.jpg", (64, 64)), ("c.png", (50, 120))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    Image.fromarray(rng.integers(0, 60000, (48, 64), dtype=np.uint16)).save(folder / "deep16.png")
    assert Image.open(folder / "deep16.png").mode == "I;16"
    Image.new("CMYK", (40, 30), (0, 80, 160, 0)).save(folder / "cmyk.jpg")
    Image.new("LA", (40, 30), (100, 128)).save(folder / "la.png")
    Image.new("1", (40, 30), 1).save(folder / "one_bit.png")
    palette = Image.new("P", (40, 30), 3)
    palette.save(folder / "palette_alpha.png", transparency=3)
    Image.fromarray(rng.random((30, 40), dtype=np.float32)).save(folder / "float.tif")
    Image.fromarray(rng.integers(0, 2**20, (30, 40), dtype=np.int32)).save(folder / "int32.tif")
    Image.new("1", (20000, 10000)).save(folder / "bomb.png")  # 24 KB on disk, 200 M pixels
    (folder / "empty.png").write_bytes(b"")
    full = folder / "full.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    (folder / "truncated.jpg").write_bytes(full.read_bytes()[:600])
    full.unlink()
    return folder


def lines_of(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
def test_predict_skips_unreadable_images_and_keeps_the_rest(model_files, tmp_path, capsys):
    config, checkpoint = model_files
    folder = hostile_folder(tmp_path / "imgs")
    out = tmp_path / "pred"
    assert predict_main(["--config", str(config), "--checkpoint", str(checkpoint), str(folder), "--score-thresh", "0.0",
                         "--output-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    skipped = {os.path.basename(s["file_name"]): s["reason"] for s in summary["skipped_images"]}
    assert skipped.keys() == BAD.keys() and all(BAD[name] in why for name, why in skipped.items())
    assert summary["images"] == len(GOOD) and summary["skipped"] == len(BAD)
    assert f"{len(BAD)} unreadable images skipped" in printed and "bomb.png" in printed
    # one line per input image, each image once; the detections are predictions.json's, in order
    lines = lines_of(out)
    assert sorted(os.path.basename(line["file_name"]) for line in lines) == sorted([*GOOD, *BAD])
    assert {os.path.basename(line["file_name"]) for line in lines if "skipped" in line} == BAD.keys()
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions == [d for line in lines for d in line.get("detections", [])]
    assert len(predictions) == summary["detections"] > 0
    assert {os.path.basename(p["file_name"]) for p in predictions} <= set(GOOD)
    assert len(list((out / "vis").iterdir())) == len(GOOD)
    # earlier predictions stay unless --overwrite; with it, the folder holds the new run only
    before = (out / "predictions.json").read_bytes()
    again = ["--config", str(config), "--checkpoint", str(checkpoint), str(folder / "a.png"), "--output-dir", str(out),
             "--no-progress", "--no-draw"]
    assert predict_main(again) == 2
    assert "already exists" in capsys.readouterr().err and (out / "predictions.json").read_bytes() == before
    assert predict_main([*again, "--overwrite"]) == 0
    assert [os.path.basename(line["file_name"]) for line in lines_of(out)] == ["a.png"]


def test_read_rgb_names_the_problem_of_a_folder_and_an_unreadable_file(tmp_path):
    (tmp_path / "x.png").mkdir()
    assert "could not be read (IsADirectoryError" in read_rgb(tmp_path / "x.png")
    locked = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(locked)
    locked.chmod(0)
    try:
        if os.geteuid() != 0:  # root reads it anyway
            assert "PermissionError" in read_rgb(locked)
    finally:
        locked.chmod(0o644)
    Image.new("1", (11000, 10000)).save(tmp_path / "warned.png")  # over PIL's warning limit, under its error
    assert "too large to decode safely" in read_rgb(tmp_path / "warned.png")


class Stop(Exception):
    """Stands for a kill: nothing after it runs."""


def wrapped_model(monkeypatch, fail):
    """rcnn-predict's model, calling fail(call number, images) before each forward."""
    import rcnn_trainer.infer.predict as predict_module

    real, calls = predict_module.inference_model, []

    def inference_model(*args, **kwargs):
        model = real(*args, **kwargs)

        def forward(images, **kw):
            calls.append(len(images))
            fail(len(calls), images)
            return model(images, **kw)
        return forward
    monkeypatch.setattr(predict_module, "inference_model", inference_model)
    return calls


def five_images(folder):
    folder.mkdir()
    for k in range(5):
        Image.new("RGB", (64, 48) if k != 3 else (128, 32), (40 * k, 90, 200)).save(folder / f"{k}.png")
    return folder


def test_a_run_stopped_after_its_first_batch_keeps_that_batch(model_files, tmp_path, monkeypatch, capsys):
    config, checkpoint = model_files
    folder, out = five_images(tmp_path / "imgs"), tmp_path / "pred"

    def stop_at_the_second_batch(call, images):
        if call == 2:
            raise Stop()
    wrapped_model(monkeypatch, stop_at_the_second_batch)
    with pytest.raises(Stop):
        predict_main(["--config", str(config), "--checkpoint", str(checkpoint), str(folder), "--output-dir", str(out),
                      "--no-progress", "--score-thresh", "0.0"])
    assert [line["file_name"] for line in lines_of(out)] == [str(folder / "0.png"), str(folder / "1.png")]
    assert all("detections" in line for line in lines_of(out)) and not (out / "predictions.json").exists()
    # what the interrupted run wrote is not replaced silently either
    assert predict_main(["--config", str(config), "--checkpoint", str(checkpoint), str(folder), "--output-dir",
                         str(out), "--no-progress"]) == 2
    assert "did not finish" in capsys.readouterr().err


def test_an_image_the_model_runs_out_of_memory_on_is_skipped_alone(model_files, tmp_path, monkeypatch):
    config, checkpoint = model_files
    folder, out = five_images(tmp_path / "imgs"), tmp_path / "pred"

    def out_of_memory_on_the_wide_image(call, images):  # 3.png, 128 x 32, is 64 x 16 at the model
        if any(img.shape[-2] == 16 for img in images):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    calls = wrapped_model(monkeypatch, out_of_memory_on_the_wide_image)
    assert predict_main(["--config", str(config), "--checkpoint", str(checkpoint), str(folder), "--output-dir",
                         str(out), "--no-progress", "--no-draw"]) == 0
    assert calls == [2, 2, 1, 1, 1]  # the failed batch (2.png, 3.png) again image by image
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 4 and [s["file_name"] for s in summary["skipped_images"]] == [str(folder / "3.png")]
    assert "ran out of memory" in summary["skipped_images"][0]["reason"]

    def a_bug(call, images):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    wrapped_model(monkeypatch, a_bug)
    with pytest.raises(RuntimeError, match="shapes"):  # not an image's problem: not skipped
        predict_main(["--config", str(config), "--checkpoint", str(checkpoint), str(folder), "--no-progress",
                      "--output-dir", str(tmp_path / "pred2")])


def test_eval_with_50_missing_images_dropped_scores_exactly_the_readable_ones(model_files, tmp_path):
    config, checkpoint = model_files
    ann_file, img_dir = resolve_splits(validate_config(tiny_dict(tmp_path), source="test"))["val"]
    raw = json.loads(ann_file.read_text())
    data = tmp_path / "data"
    data.mkdir()
    for im in raw["images"]:
        shutil.copy(img_dir / im["file_name"], data / im["file_name"])
    (data / "junk.png").write_bytes(b"not an image")
    missing = [{"id": 1000 + k, "file_name": f"gone{k}.png", "width": 64, "height": 64} for k in range(50)]
    for im in missing:  # present when the file is indexed, unreadable when it is loaded
        os.link(data / "junk.png", data / im["file_name"])
    with_missing = dict(raw, images=raw["images"][:3] + missing + raw["images"][3:])
    outcomes = {}
    for name, content in (("clean", raw), ("missing", with_missing)):
        (data / f"{name}.json").write_text(json.dumps(content))
        split = {"ann_file": str(data / f"{name}.json"), "img_dir": str(data)}
        settings = tiny_dict(tmp_path, data={"train": split, "val": split, "check_images": 0,
                                             "bad_records": {"missing_image": "drop"}})
        settings["data"].pop("synthetic")
        cfg = write_yaml(tmp_path / f"{name}.yaml", settings)
        assert eval_main(["--config", str(cfg), "--checkpoint", str(checkpoint), "--output-dir",
                          str(tmp_path / name), "--no-progress"]) == 0
        outcomes[name] = (json.loads((tmp_path / name / "metrics.json").read_text()),
                          json.loads((tmp_path / name / "coco_results.json").read_text()))
    (clean, clean_results), (dropped, dropped_results) = outcomes["clean"], outcomes["missing"]
    assert clean_results  # something to compare
    assert dropped["images_scored"] == clean["images_scored"] == len(raw["images"])
    assert dropped["images_skipped"] == 50 and clean["images_skipped"] == 0
    # no stand-in predicted twice, no dropped image scored as one with nothing detected
    key = lambda r: (r["image_id"], r["category_id"], r["score"], tuple(r["bbox"]))  # noqa: E731
    assert sorted(map(key, dropped_results)) == sorted(map(key, clean_results))
    assert {k: dropped[k] for k in ("AP", "AP50", "AR100")} == {k: clean[k] for k in ("AP", "AP50", "AR100")}


def unreadable_then_one_good(tmp_path, bad: int, good: bool = True) -> CocoDetection:
    images = [image(k + 1) for k in range(bad + good)]
    write_coco(tmp_path, images[bad:], [])
    (tmp_path / "junk.png").write_bytes(b"junk")
    for im in images[:bad]:
        os.link(tmp_path / "junk.png", tmp_path / im["file_name"])
    path = write_coco(tmp_path, images, [], make_files=False)
    return CocoDetection(path, tmp_path, policy=RecordPolicy(missing_image="drop"), check_images=0)


def test_training_reads_the_next_readable_image_in_a_loop_and_stops_when_there_is_none(tmp_path):
    dataset = unreadable_then_one_good(tmp_path / "long", 1100)  # deeper than the recursion limit
    _, target = dataset[(0, 0)]
    assert target["image_id"] == 1101 and dataset.report.counts["missing_image"] == 1100
    dataset = unreadable_then_one_good(tmp_path / "none", 5, good=False)
    with pytest.raises(UserError, match=r"none of its 5 images can be read.*the last: image id 2 '.*im2\.png'"):
        dataset[(2, 0)]  # round from the third: the second is the last tried


def test_evaluation_skips_an_unreadable_image_and_collate_leaves_it_out(tmp_path):
    dataset = unreadable_then_one_good(tmp_path, 2)
    dataset.skip_unreadable = True
    items = [dataset[i] for i in range(3)]
    assert items[:2] == [None, None]
    images, targets = collate(items)
    assert len(images) == 1 and [t["image_id"] for t in targets] == [3]


def polygon(x, y, r, points=16):
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return np.stack([x + r * np.cos(angles), y + r * np.sin(angles)], 1).ravel().tolist()


def test_masks_are_rasterized_at_the_input_size_not_the_files(tmp_path):
    from pycocotools import mask as mask_utils

    side, count = 1500, 40
    rng = np.random.default_rng(0)
    anns = []
    for k in range(count):
        x, y, r = *rng.uniform(200, side - 200, 2), rng.uniform(100, 150)
        segmentation = [polygon(x, y, r)]
        if k % 2:  # half as compressed RLEs
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, side, side))
            segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        anns.append({"id": k + 1, "image_id": 1, "category_id": 7, "bbox": [x - r, y - r, 2 * r, 2 * r],
                     "iscrowd": 0, "area": 4 * r * r, "segmentation": segmentation})
    path = write_coco(tmp_path, [image(1, side, side)], anns)
    dataset = CocoDetection(path, tmp_path, masks=True, check_images=0,
                            transforms=build_transforms(200, 200, 0.0, train=True))
    tracemalloc.start()
    try:
        img, target = dataset[(0, 0)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert img.shape[-2:] == (200, 200) and target["masks"].shape == (count, 200, 200)
    full_size = count * side * side  # bytes of the masks at the file's size: 90 MB
    assert peak < full_size / 10, f"{peak / 1e6:.0f} MB traced while loading"
    # the same masks as rasterizing at full size and resizing (polygons: up to their edge pixels)
    for k in (0, 1):
        full = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon(*_circle(anns[k]))], side, side)))
        expected = resize_masks(torch.from_numpy(full[None]), 200, 200)[0].bool()
        got = target["masks"][k].bool()
        assert (got & expected).sum() / (got | expected).sum() > (0.99 if k % 2 else 0.85)


def _circle(ann):
    x, y, w, _ = ann["bbox"]
    return x + w / 2, y + w / 2, w / 2


def test_predict_refuses_a_folder_it_did_not_create_that_holds_predictions(model_files, tmp_path, capsys):
    config, checkpoint = model_files
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "predictions.json").write_text("[]  # someone's work")
    run = ["--config", str(config), "--checkpoint", str(checkpoint), str(tmp_path / "a.png"), "--output-dir",
           str(theirs), "--no-progress", "--no-draw"]
    assert predict_main(run) == 2
    err = capsys.readouterr().err
    assert "'predictions.json'" in err and "did not create this folder" in err and "--overwrite" in err
    assert (theirs / "predictions.json").read_text() == "[]  # someone's work"
    assert predict_main([*run, "--overwrite"]) == 0 and (theirs / "run.json").is_file()
    assert json.loads((theirs / "predictions.json").read_text()) == [
        d for line in lines_of(theirs) for d in line["detections"]]
