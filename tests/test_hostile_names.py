"""Names from a dataset never become paths: image ids of any allowed type (int, str, both side by
side) through evaluation, analysis and drawing; file names that leave img_dir; eval outputs
that would replace a user's files (issue 37, item 3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_dict, write_coco, write_yaml
from rcnn_trainer.cli import eval_main
from rcnn_trainer.data.coco import CocoDetection, RecordPolicy
from rcnn_trainer.errors import UserError

# 1 and "1" are two images, as JSON says; '../../escaped_0' and 'a/b' would be paths if drawn by id
IDS = ["../../escaped_0", 7, "7", "a/b"]
CATEGORIES = [{"id": c, "name": f"c{c}"} for c in (1, 2, 3, 4)]


def hostile_coco(folder: Path, ids=IDS) -> Path:
    """One image per id (64 x 48), each with its own box and class, so that two merged ids would
    pair one image's detections with the other's objects."""
    images = [{"id": image_id, "file_name": f"im{i}.png", "width": 64, "height": 48} for i, image_id in enumerate(ids)]
    annotations = [{"id": i + 1, "image_id": image_id, "category_id": i % 4 + 1,
                    "bbox": [4.0 + 8 * i, 6.0, 20.0, 16.0 + 4 * i], "iscrowd": 0, "area": 20.0 * (16 + 4 * i)}
                   for i, image_id in enumerate(ids)]
    return write_coco(folder, images, annotations, CATEGORIES)


def config_for(folder: Path, ann: Path, img_dir: Path) -> Path:
    """The tiny model's config on one COCO file (train and val)."""
    raw = tiny_dict(folder)
    raw["data"].pop("synthetic")
    raw["data"]["train"] = raw["data"]["val"] = {"ann_file": str(ann), "img_dir": str(img_dir)}
    return write_yaml(folder / "c.yaml", raw)


def files_under(root: Path) -> set[Path]:
    return {Path(folder, name) for folder, _, names in os.walk(root) for name in names}


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """(root, config path, checkpoint) on the hostile file: a checkpoint of the tiny model as built
    (no training; its near-uniform scores still give every image detections above 0.05)."""
    from rcnn_trainer.config_loader import config_to_dict, validate_config
    from rcnn_trainer.runtime.checkpoint import write_checkpoint
    from rcnn_trainer.data.settings import resolve_head_size
    from rcnn_trainer.model.build import build_model

    root = tmp_path_factory.mktemp("hostile")
    ann = hostile_coco(root / "data" / "images")
    config = config_for(root, ann, ann.parent)
    cfg = resolve_head_size(validate_config(yaml.safe_load(config.read_text()), source="test"), say=lambda _: None)
    torch.manual_seed(0)
    checkpoint = root / "untrained.pth"
    write_checkpoint({"model": build_model(cfg.model).state_dict(), "config": config_to_dict(cfg)}, checkpoint)
    return root, config, checkpoint


def test_string_and_mixed_ids_score_like_int_ids(tmp_path):
    """Detections exactly on each image's object, written with the file's ids: AP 1 only if every
    id reaches pycocotools as its own image (7 and "7" not merged, no int() of a string)."""
    from rcnn_trainer.analysis.report import analyze
    from rcnn_trainer.infer.evaluate import coco_metrics

    dataset = CocoDetection(hostile_coco(tmp_path), tmp_path)
    assert [r.image_id for r in dataset.records] == IDS
    gt = dataset.coco_api()
    assert sorted(len(gt.imgToAnns[i]) for i in gt.getImgIds()) == [1, 1, 1, 1]
    results = [{"image_id": r.image_id, "category_id": dataset.label_to_cat_id[int(r.labels[0])],
                "bbox": [float(r.boxes[0, 0]), float(r.boxes[0, 1]), float(r.boxes[0, 2] - r.boxes[0, 0]),
                         float(r.boxes[0, 3] - r.boxes[0, 1])], "score": 0.9} for r in dataset.records]
    assert coco_metrics(dataset, results)["AP"] == pytest.approx(1.0)
    # 7's detection handed to "7": both images now hold a wrong box
    swapped = [dict(r, image_id={7: "7", "7": 7}.get(r["image_id"], r["image_id"])) for r in results]
    assert coco_metrics(dataset, swapped)["AP"] < 0.9
    report = analyze(dataset, results, tmp_path / "analysis", say=lambda _: None)
    assert report["breakdown"]["overall"]["C50"] == pytest.approx(1.0) and report["label_issues"] == []


@pytest.mark.parametrize("bad_id", [True, None, 1.5, [1], {"a": 1}])
def test_image_ids_of_other_types_are_refused_naming_the_record(tmp_path, bad_id):
    path = hostile_coco(tmp_path, ids=[1, bad_id])
    with pytest.raises(UserError, match=r"ann\.json: images\[1\]: id must be an integer \(or a string\)"):
        CocoDetection(path, tmp_path)


def test_eval_with_hostile_ids_writes_only_inside_its_folder(untrained, capsys):
    root, config, checkpoint = untrained
    out = root / "deep" / "er" / "eval"  # '../../escaped_0' drawn by id would land in root/deep
    before = files_under(root)
    code = eval_main(["--config", str(config), "--checkpoint", str(checkpoint), "--output-dir", str(out),
                      "--visualize", "2", "--analyze", "--analyze-score", "0.05", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    new = files_under(root) - before
    assert new and all(out in path.parents for path in new), sorted(map(str, new - files_under(out)))
    assert {"AP", "AP50", "per_class_AP"} <= json.loads((out / "metrics.json").read_text()).keys()
    results = json.loads((out / "coco_results.json").read_text())
    assert sorted({json.dumps(r["image_id"]) for r in results}) == sorted(json.dumps(i) for i in IDS)
    assert sorted(p.name for p in (out / "vis").iterdir()) == ["00000__.._escaped_0.png", "00001_7.png"]
    issues = json.loads((out / "label_issues.json").read_text())
    assert issues and {json.dumps(i["image_id"]) for i in issues} <= {json.dumps(i) for i in IDS}
    drawn = sorted(p.name for p in (out / "label_issues").iterdir())
    assert len(drawn) == 2 and all(name.startswith(("001_", "002_")) and "/" not in name for name in drawn)


def unsafe_names_coco(root: Path) -> tuple[Path, Path]:
    """img_dir root/data/images; images[1] reaches root/data/outside.png by '..', images[2] by its
    absolute path: both real images, which only the check keeps out."""
    img_dir = root / "data" / "images"
    write_coco(root / "data", [{"id": 1, "file_name": "outside.png", "width": 64, "height": 48}], [])
    images = [{"id": 0, "file_name": "im0.png", "width": 64, "height": 48},
              {"id": 1, "file_name": "../outside.png", "width": 64, "height": 48},
              {"id": 2, "file_name": str(root / "data" / "outside.png"), "width": 64, "height": 48},
              {"id": 3, "file_name": "sub/../im3.png", "width": 64, "height": 48},  # stays inside
              {"id": 4, "file_name": str(img_dir / "im4.png"), "width": 64, "height": 48}]  # absolute, inside
    annotations = [{"id": i + 1, "image_id": image["id"], "category_id": 1, "bbox": [4, 4, 20, 20]}
                   for i, image in enumerate(images)]
    ann = write_coco(img_dir, [images[0], dict(images[3], file_name="im3.png"), dict(images[4], file_name="im4.png")],
                     [], CATEGORIES)
    (img_dir / "sub").mkdir()
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return ann, img_dir


def test_file_names_leaving_img_dir_are_bad_records(tmp_path):
    ann, img_dir = unsafe_names_coco(tmp_path)
    with pytest.raises(UserError) as err:
        CocoDetection(ann, img_dir)
    message = str(err.value)
    assert str(ann) in message and "images[1] (id 1)" in message and "'../outside.png'" in message
    assert "data.bad_records.unsafe_path: drop" in message
    dropped = CocoDetection(ann, img_dir, policy=RecordPolicy(unsafe_path="drop"))
    assert [r.image_id for r in dropped.records] == [0, 3, 4]
    assert dropped.report.counts["unsafe_path"] == 2 and "images[2] (id 2)" in dropped.report.lines()[0]


def test_eval_refuses_or_drops_an_escaping_file_name(untrained, tmp_path, capsys):
    _, _, checkpoint = untrained
    ann, img_dir = unsafe_names_coco(tmp_path)
    config = config_for(tmp_path, ann, img_dir)
    args = ["--config", str(config), "--checkpoint", str(checkpoint), "--no-progress"]
    assert eval_main([*args, "--output-dir", str(tmp_path / "e1")]) == 2
    err = capsys.readouterr().err
    assert "images[1] (id 1)" in err and "data.bad_records.unsafe_path: drop" in err
    assert not (tmp_path / "e1" / "metrics.json").exists()
    assert eval_main([*args, "--output-dir", str(tmp_path / "e2"), "data.bad_records.unsafe_path=drop"]) == 0
    results = json.loads((tmp_path / "e2" / "coco_results.json").read_text())
    assert {r["image_id"] for r in results} <= {0, 3, 4}


def test_eval_never_replaces_a_users_files_unless_told(untrained, tmp_path, capsys):
    _, _, checkpoint = untrained
    ann = hostile_coco(tmp_path / "images", ids=[1, 2, 3, 4])
    config = config_for(tmp_path, ann, ann.parent)
    theirs = tmp_path / "mine"
    theirs.mkdir()
    (theirs / "metrics.json").write_text("my numbers\n")
    args = ["--config", str(config), "--checkpoint", str(checkpoint), "--output-dir", str(theirs), "--no-progress"]
    assert eval_main(args) == 2
    err = capsys.readouterr().err
    assert "'metrics.json'" in err and "--overwrite" in err
    assert (theirs / "metrics.json").read_text() == "my numbers\n" and sorted(os.listdir(theirs)) == ["metrics.json"]
    assert eval_main([*args, "--overwrite"]) == 0
    assert "AP" in json.loads((theirs / "metrics.json").read_text())
    assert eval_main(args) == 0  # claimed now: written again without asking


def test_eval_folder_of_our_run_folder_is_ours(untrained, tmp_path):
    """<run>/eval of a run folder rcnn-train claimed, filled by an rcnn-eval from before eval folders
    had their own marker: written again without --overwrite."""
    from rcnn_trainer.run_folder import claim_folder

    _, _, checkpoint = untrained
    ann = hostile_coco(tmp_path / "images", ids=[1, 2, 3, 4])
    config = config_for(tmp_path, ann, ann.parent)
    claim_folder(tmp_path / "run", "rcnn-train", [])
    (tmp_path / "run" / "eval").mkdir()
    (tmp_path / "run" / "eval" / "metrics.json").write_text("{}")
    assert eval_main(["--config", str(config), "--checkpoint", str(checkpoint), "--no-progress"]) == 0
    assert "AP" in json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
