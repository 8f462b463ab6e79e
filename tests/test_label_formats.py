"""VOC, YOLO and LabelMe labels (rcnn_trainer/data/labels/): each reader on tiny files, every
malformed kind (exit 2 or counted by its policy, naming the file and line or object), auto
detection, rcnn-convert, and one tiny VOC run through rcnn-train and rcnn-eval --analyze."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_dict, write_yaml
from rcnn_trainer.cli import convert_main, eval_main, train_main
from rcnn_trainer.config_loader import validate_config
from rcnn_trainer.data.coco import CocoDetection
from rcnn_trainer.data.labels import class_order_warning, detect_format, read_labels
from rcnn_trainer.data.records import DropReport, RecordPolicy
from rcnn_trainer.errors import UserError
from tools.write_label_formats import write_labelme, write_voc, write_yolo


def _png(path: Path, w: int = 40, h: int = 30) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)
    return path


def _voc_xml(filename: str = "a.png", objects: str = "", size: str = "<size><width>40</width><height>30</height>"
             "</size>") -> str:
    return f"<annotation><filename>{filename}</filename>{size}{objects}</annotation>"


def _obj(name: str, box, difficult: int = 0) -> str:
    corners = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>{corners}</bndbox></object>"


def _voc(tmp_path: Path, xml: str, name: str = "a.xml") -> tuple[Path, Path]:
    _png(tmp_path / "JPEGImages" / "a.png")
    (tmp_path / "Annotations").mkdir(exist_ok=True)
    (tmp_path / "Annotations" / name).write_text(xml)
    return tmp_path / "Annotations", tmp_path / "JPEGImages"


def _read(ann, img_dir, fmt, policy=None, split="train"):
    report = DropReport()
    raw, folder = read_labels(ann, img_dir, fmt, split, policy or RecordPolicy(), report)
    return CocoDetection(ann, folder, raw=raw, report=report, policy=policy), report


def test_voc_corners_difficult_size_from_header_and_id_list(tmp_path):
    xml = _voc_xml("wrong_name.jpg", _obj("dog", (1, 2, 10, 20), difficult=1) + _obj("cat", (5, 5, 45, 20)), size="")
    ann, img_dir = _voc(tmp_path, xml)
    ds, report = _read(ann, img_dir, "voc")
    record = ds.records[0]
    assert (record.width, record.height) == (40, 30)  # no <size>: the header; no such <filename>: a.* by the xml's name
    assert ds.class_names == ["cat", "dog"]
    # 1-based inclusive corners -> 0-based; the cat's box clipped at the border, counted naming file and object
    assert record.boxes.tolist() == [[0.0, 1.0, 10.0, 20.0], [4.0, 4.0, 40.0, 20.0]]
    assert "a.xml: object 2 ('cat')" in " ".join(report.lines())
    # difficult: trained on (in the record), ignored by evaluation (a crowd region for pycocotools)
    assert [a["iscrowd"] for a in ds.evaluation_json["annotations"]] == [1, 0]
    # a checkpoint that numbers the classes otherwise (COCO ids vs VOC's name order) is named by rcnn-eval
    assert class_order_warning(["cat", "dog"], ds) is None and "dog', 'cat" in class_order_warning(["dog", "cat"], ds)
    (ann / "a.xml").write_text(_voc_xml("/home/someone/Pictures/a.png", _obj("dog", (1, 1, 5, 5))))
    assert _read(ann, img_dir, "voc")[0].records[0].file == str(img_dir / "a.png")  # the name part, under img_dir
    ids = tmp_path / "ImageSets" / "Main" / "train.txt"
    ids.parent.mkdir(parents=True)
    ids.write_text("a\n")
    assert detect_format(ids) == "voc" and len(_read(ids, img_dir, "voc")[0].records) == 1
    ids.write_text("../../etc/passwd\n")
    with pytest.raises(UserError, match="train.txt: line 1: id '../../etc/passwd' is not a plain file name"):
        _read(ids, img_dir, "voc")


def test_yolo_yaml_folder_polygons_and_negatives(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        _png(tmp_path / "images" / "train" / name, 40, 20)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.5 0.5\n\n0 0.1 0.1 0.6 0.1 0.6 0.6\n")
    spec = write_yaml(tmp_path / "data.yaml", {"path": ".", "train": "images/train", "val": "images/train",
                                               "names": {0: "x", 1: "y"}})
    ds, report = _read(spec, None, "yolo")
    assert ds.class_names == ["x", "y"] and ds.label_to_cat_id == {1: 0, 2: 1}  # category id = YOLO class index
    by_file = {Path(r.file).name: r for r in ds.records}
    assert by_file["a.jpg"].boxes.tolist() == [[10.0, 5.0, 30.0, 15.0], [4.0, 2.0, 24.0, 12.0]]
    assert by_file["a.jpg"].labels.tolist() == [2, 1]
    assert ds.raw["annotations"][1]["segmentation"] == [[4.0, 2.0, 24.0, 2.0, 24.0, 12.0]]
    assert len(by_file["b.jpg"].labels) == 0 and "used as a negative" in " ".join(report.lines())
    # a labels folder with classes.txt; a label file without its image is the missing_image policy
    (tmp_path / "labels" / "train" / "classes.txt").write_text("x\ny\n")
    assert detect_format(tmp_path / "labels" / "train") == "yolo"
    ds, _ = _read(tmp_path / "labels" / "train", tmp_path / "images" / "train", "yolo")
    assert ds.class_names == ["x", "y"] and len(ds.records) == 2
    (tmp_path / "labels" / "train" / "c.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(UserError, match=r"c\.txt: the whole file: a label file without its image"):
        _read(spec, None, "yolo")
    _, report = _read(spec, None, "yolo", RecordPolicy(missing_image="drop"))
    assert report.counts["missing_image"] == 1


def test_labelme_rectangles_polygons_groups(tmp_path):
    _png(tmp_path / "imgs" / "a.jpg")
    shapes = [{"label": "p", "shape_type": "polygon", "points": [[1, 1], [10, 1], [10, 10]], "group_id": 4},
              {"label": "p", "shape_type": "polygon", "points": [[20, 20], [25, 20], [25, 28]], "group_id": 4},
              {"label": "r", "shape_type": "rectangle", "points": [[20, 20], [5, 5]]},
              {"label": "r", "shape_type": "point", "points": [[2, 2]]}]
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "a.json").write_text(json.dumps({"imagePath": "../imgs/a.jpg", "imageWidth": 40,
                                                         "imageHeight": 30, "shapes": shapes, "imageData": None}))
    assert detect_format(tmp_path / "lm") == "labelme"
    ds, report = _read(tmp_path / "lm", tmp_path / "imgs", "labelme")
    assert ds.records[0].boxes.tolist() == [[1.0, 1.0, 25.0, 28.0], [5.0, 5.0, 20.0, 20.0]]  # the group is one object
    assert len(ds.raw["annotations"][0]["segmentation"]) == 2 and "point shapes" in " ".join(report.lines())


def test_auto_detection_and_config(tmp_path):
    ann, img_dir = _voc(tmp_path, _voc_xml(objects=_obj("dog", (1, 1, 5, 5))))
    assert detect_format(ann) == detect_format(ann / "a.xml") == "voc"
    (tmp_path / "c.json").write_text("{}")
    (tmp_path / "d.yaml").write_text("train: x\n")
    assert detect_format(tmp_path / "c.json") == "coco" and detect_format(tmp_path / "d.yaml") == "yolo"
    with pytest.raises(UserError, match="holds no label file"):
        detect_format(img_dir)
    split = {"ann_file": str(ann), "img_dir": str(img_dir)}
    cfg = validate_config(tiny_dict(tmp_path, data={"synthetic": None, "train": split, "val": split}), "t")
    assert cfg.data.train.format == "auto"
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: [a]\n")
    yolo = {"ann_file": str(tmp_path / "data.yaml")}  # a dataset yaml names its images: img_dir may be left out
    assert validate_config(tiny_dict(tmp_path, data={"synthetic": None, "train": yolo, "val": yolo}), "t")
    for bad, message in (({"ann_file": str(ann)}, "img_dir is required"),
                         ({**split, "format": "csv"}, "format")):
        with pytest.raises(UserError, match=message):
            validate_config(tiny_dict(tmp_path, data={"synthetic": None, "train": bad, "val": split}), "t")


BOMB = ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        '<annotation><filename>&b;</filename></annotation>')
EXTERNAL = '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/passwd">]><annotation>&e;</annotation>'


@pytest.mark.parametrize("xml, message", [
    ("<doc><x/></doc>", "XML that is not Pascal VOC: the root element is <doc>"),
    ("<annotation><object>", "not well-formed XML"),
    (BOMB, "declares entities or external references"),
    (EXTERNAL, "declares entities or external references"),
    ("<annotation>" + "<a>" * 40 + "</a>" * 40 + "</annotation>", "nests deeper than 16"),
    (_voc_xml(objects=_obj("dog", (1, 1, "x", 5))), r"object 1 \('dog'\): <bndbox> needs numbers"),
    (_voc_xml(objects="<object><name>dog</name></object>"), r"object 1 \('dog'\): needs a <name> and a <bndbox>"),
    (_voc_xml(objects=_obj("dog", (1, 1, "nan", 5))), r"object 1 \('dog'\): box .* non-finite"),
    (_voc_xml(objects=_obj("dog", (1, 1, 80, 5))), "extends 40.0 px outside"),
    (_voc_xml("../../x.png", _obj("dog", (1, 1, 5, 5))), "<filename>: '../../x.png' leads outside img_dir"),
    (_voc_xml("b.png", _obj("dog", (1, 1, 5, 5))).replace("a.png", "b.png"), None),
])
def test_malformed_voc_exit_2_naming_file_and_object(tmp_path, xml, message):
    ann, img_dir = _voc(tmp_path, xml, name="z.xml")
    policy = RecordPolicy(box_outside_image="error")
    if message is None:  # <filename> b.png does not exist (nor z.*): a label file without its image
        message = "z.xml: <filename>: a label file without its image"
    with pytest.raises(UserError, match=message) as err:
        _read(ann, img_dir, "voc", policy)
    assert "z.xml" in str(err.value)


@pytest.mark.parametrize("line, message, kind", [
    ("0 0.5 0.5", "line 2: expected 'class cx cy w h'", None),
    ("zero 0.5 0.5 0.1 0.1", "line 2: expected", None),
    ("0 0.5 0.5 0.1 0.1 0.3", "line 2: expected", None),
    ("7 0.5 0.5 0.1 0.1", "line 2: class 7 is not one of the 2 classes", "unknown_category"),
    ("0 nan 0.5 0.1 0.1", "line 2: box .* non-finite", "non_finite_box"),
    ("0 0.5 0.5 3 0.1", "line 2: box .* outside the 40x30 image", "box_outside_image"),
    ("0 0.5 0.5 0 0.1", "line 2: box .* zero or negative size", "degenerate_box"),
])
def test_malformed_yolo_exit_2_or_counted(tmp_path, line, message, kind):
    _png(tmp_path / "images" / "a.png")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "classes.txt").write_text("x\ny\n")
    (tmp_path / "labels" / "a.txt").write_text(f"1 0.5 0.5 0.2 0.2\n{line}\n")
    policy = RecordPolicy(box_outside_image="error", degenerate_box="error")
    with pytest.raises(UserError, match=message) as err:
        _read(tmp_path / "labels", tmp_path / "images", "yolo", policy)
    assert "a.txt: line 2" in str(err.value)
    if kind is not None:  # the policy's other choice: counted, the good line kept
        ds, report = _read(tmp_path / "labels", tmp_path / "images", "yolo", RecordPolicy(**{kind: "drop"}))
        assert report.counts[kind] == 1 and len(ds.records[0].labels) == 1


@pytest.mark.parametrize("content, message", [
    ({"imagePath": "a.jpg"}, "not a LabelMe file"),
    ({"imagePath": "a.jpg", "imageWidth": 40, "imageHeight": 30,
      "shapes": [{"label": "r", "shape_type": "rectangle", "points": [[1, 1], [2, 2], [3, 3]]}]},
     r"shapes\[0\] \('r'\): a rectangle needs 2 points"),
    ({"imagePath": "a.jpg", "imageWidth": 40, "imageHeight": 30, "shapes": [{"label": "r", "points": [[1, "x"]]}]},
     r"shapes\[0\] \('r'\): a shape needs"),
    ({"imagePath": "gone.jpg", "imageWidth": 40, "imageHeight": 30, "shapes": []}, "imagePath: a label file without"),
    ({"imagePath": "../../../etc/hosts", "imageWidth": 40, "imageHeight": 30, "shapes": []}, "imagePath"),
])
def test_malformed_labelme_exit_2(tmp_path, content, message):
    _png(tmp_path / "lm" / "a.jpg")
    (tmp_path / "lm" / "a.json").write_text(json.dumps(content))
    with pytest.raises(UserError, match=message) as err:
        _read(tmp_path / "lm", tmp_path / "lm", "labelme")
    assert "a.json" in str(err.value)


def test_convert_and_tiny_voc_run_train_eval_analyze(tmp_path, capsys):
    """The synthetic split written as VOC: rcnn-convert gives the COCO records back; rcnn-train and
    rcnn-eval --analyze run on the VOC folders with only ann_file / img_dir set."""
    from rcnn_trainer.data.synthetic import ensure_synthetic_dataset

    folder = ensure_synthetic_dataset(12, 6, 64, 3, tmp_path / "cache")
    splits = {}
    for split in ("train", "val"):
        coco = json.loads((folder / f"{split}.json").read_text())
        splits[split] = {"ann_file": str(write_voc(coco, tmp_path / f"voc_{split}")), "img_dir": str(folder / "images")}
    out = tmp_path / "val.json"
    argv = ["--to", "coco", "--ann-file", splits["val"]["ann_file"], "--img-dir", splits["val"]["img_dir"],
            "--output", str(out)]
    assert convert_main(argv) == 0 and convert_main(argv) == 2  # never overwrites without --overwrite
    assert "already exists" in capsys.readouterr().err and convert_main([*argv, "--overwrite"]) == 0
    ref, back = CocoDetection(folder / "val.json", folder / "images"), CocoDetection(out, folder / "images")
    assert [(Path(r.file).name, r.boxes.tolist(), [ref.class_names[i - 1] for i in r.labels]) for r in ref.records] \
        == [(Path(r.file).name, r.boxes.tolist(), [back.class_names[i - 1] for i in r.labels]) for r in back.records]
    config = write_yaml(tmp_path / "c.yaml", tiny_dict(tmp_path, data={"synthetic": None, **splits},
                                                       solver={"max_iters": 2}))
    assert convert_main(["--to", "coco", "--config", str(config), "--split", "train", "--out", str(out)]) == 2
    assert convert_main(["--to", "coco", "--config", str(config), "--out", str(tmp_path / "train.json")]) == 0
    assert len(json.loads((tmp_path / "train.json").read_text())["images"]) == 12
    assert train_main(["--config", str(config), "--no-progress"]) == 0
    assert "read Pascal VOC XML labels" in capsys.readouterr().out
    assert eval_main(["--config", str(config), "--checkpoint", str(tmp_path / "run" / "model_final.pth"),
                      "--analyze", "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert "AP" in metrics and (tmp_path / "run" / "eval" / "label_issues.json").is_file()
    results = json.loads((tmp_path / "run" / "eval" / "coco_results.json").read_text())
    assert all(r["image_id"].startswith("val_") for r in results)  # image ids name the original label files


def test_writers_round_trip_yolo_and_labelme(tmp_path):
    from rcnn_trainer.data.synthetic import ensure_synthetic_dataset

    folder = ensure_synthetic_dataset(12, 6, 64, 3, tmp_path / "cache")
    coco = json.loads((folder / "val.json").read_text())
    ref = CocoDetection(folder / "val.json", folder / "images")
    yaml_file = write_yolo(coco, tmp_path / "yolo", img_dir=folder / "images").parent / "data.yaml"
    labelme = write_labelme(coco, tmp_path / "labelme", folder / "images", polygons=True)
    for ann, img_dir, fmt in ((yaml_file, None, "yolo"), (labelme, folder / "images", "labelme")):
        back, _ = _read(ann, img_dir, fmt, split="val")
        assert sorted(back.class_names) == sorted(ref.class_names) and len(back.records) == len(ref.records)
        for a, b in zip(ref.records, back.records):  # VOC and LabelMe number the classes in name order
            assert [ref.class_names[i - 1] for i in a.labels] == [back.class_names[i - 1] for i in b.labels]
            if fmt == "yolo":
                assert np.abs(a.boxes - b.boxes).max(initial=0) < 1e-3
    assert all("segmentation" in a for a in back.raw["annotations"])
