"""Hostile VOC, YOLO and LabelMe labels through the real readers (issue 40): every case must end
in success or a UserError (exit 2) within --time-limit seconds; a traceback is a bug.

Kinds:
- voc / yolo / labelme: a valid tiny split whose label files are mutated at random (characters
  cut, hostile tokens inserted: nan, 1e999, -1, '..', NUL, '<', '&', huge integers, lines
  doubled or truncated; LabelMe values replaced by wrong types, deep lists, huge strings), read
  with format auto or the format named, every policy 'error' or every policy 'drop', then every
  item loaded and the evaluation index built;
- fixed: an XML entity bomb ("billion laughs"), an external entity (file:///etc/passwd), a
  parameter entity, a DOCTYPE with external DTD, a 65 MiB (sparse) XML, 100,000-deep XML, a YOLO
  yaml alias bomb and one whose `path`/`train` lead to /, a label file that is a folder, a link
  to /dev/zero, binary garbage.

    python tools/hostile_labels.py --count 300
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from write_label_formats import write_labelme, write_voc, write_yolo  # noqa: E402

from rcnn_trainer.data.coco import CocoDetection  # noqa: E402
from rcnn_trainer.data.labels import detect_format, read_labels  # noqa: E402
from rcnn_trainer.data.records import DropReport, RecordPolicy  # noqa: E402
from rcnn_trainer.errors import UserError  # noqa: E402

TOKENS = ["nan", "inf", "-1", "1e999", "-1e999", "99999999999999999999999", "0", "", " ", "\n", "..", "../../",
          "/etc/passwd", "\0", "<", ">", "&", "&amp;", "<!ENTITY x 'y'>", "]]>", "\xff\xfe", "é", "#", "0x10", "1.5.3"]
VALUES = [None, True, -1, 0, 1e308, float("nan"), "", "x" * 10_000, [], {}, [[[[[[[[]]]]]]]] * 3, {"a": {"b": 1}},
          "../../../etc/passwd", "/dev/zero", [1, 2], [[1, "x"]], [[1e308, -1e308], [0, 0]]]
POLICY_KINDS = ("missing_image", "unknown_category", "degenerate_box", "non_finite_box", "box_outside_image",
                "bad_mask", "unsafe_path")
COCO = {"images": [{"id": i, "file_name": f"im{i}.png", "width": 40, "height": 30} for i in (1, 2, 3)],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8],
                         "segmentation": [[2, 3, 12, 3, 12, 11]]},
                        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [20, 5, 10, 20]},
                        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 30]}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}


class Hang(BaseException):
    pass


def _mutate_text(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(text) + 1)
        action = rng.random()
        numbers = list(re.finditer(r"-?\d+(\.\d+)?", text))
        if action < 0.5 and numbers:  # a number replaced: the structure stays, a value turns hostile
            m = rng.choice(numbers)
            text = text[:m.start()] + rng.choice(TOKENS + ["1e9", "-5", "0.0", "2", "7", "1.5"]) + text[m.end():]
        elif action < 0.65:
            text = text[:at] + rng.choice(TOKENS) + text[at + rng.randint(0, 6):]
        elif action < 0.75:
            text = text[:at] + text[at + rng.randint(1, 40):]
        elif action < 0.9:
            lines = text.splitlines(keepends=True) or [""]
            k = rng.randrange(len(lines))
            text = "".join(lines[:k] + [lines[k]] * rng.randint(2, 50) + lines[k + 1:])
        else:
            text = text[:at]
    return text


def _mutate_json(data, rng: random.Random):
    node, parent, key = data, None, None
    for _ in range(rng.randint(1, 4)):  # walk down to a random place and replace it
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) if isinstance(
            node, list) else []
        if not children:
            break
        key, child = rng.choice(children)
        parent = node
        if not isinstance(child, (dict, list)) or rng.random() < 0.3:
            break
        node = child
    if parent is not None:
        parent[key] = rng.choice(VALUES)
    return data


def _split(folder: Path, fmt: str, rng: random.Random) -> tuple[Path, Path | None]:
    images = folder / "images"
    images.mkdir(parents=True)
    for image in COCO["images"]:
        Image.fromarray(np.full((30, 40, 3), 100, np.uint8)).save(images / image["file_name"])
    if fmt == "voc":
        ann = write_voc(COCO, folder / "voc")
    elif fmt == "yolo":
        ann = write_yolo(COCO, folder / "yolo", polygons=rng.random() < 0.5, img_dir=images).parent / "data.yaml"
    else:
        ann = write_labelme(COCO, folder / "labelme", images, polygons=rng.random() < 0.5)
    files = [p for p in sorted(ann.parent.rglob("*")) if p.is_file() and not p.is_symlink() and p.suffix != ".png"
             and (p.suffix != ".yaml" and p.name != "classes.txt" or rng.random() < 0.2)]
    for path in rng.sample(files, rng.randint(1, min(2, len(files)))):
        if path.suffix == ".json" and rng.random() < 0.7:
            path.write_text(json.dumps(_mutate_json(json.loads(path.read_text()), rng)))
        else:
            path.write_text(_mutate_text(path.read_text(), rng), errors="surrogateescape")
    return ann, None if fmt == "yolo" else images


def _fixed_cases(folder: Path) -> list[tuple[str, Path, Path | None]]:
    images = folder / "images"
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(images / "a.png")
    cases = {
        "entity_bomb.xml": '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">' + "".join(
            f'<!ENTITY {c} "{("&" + p + ";") * 10}">' for p, c in zip("abcdefgh", "bcdefghi"))
            + ']><annotation><filename>&i;</filename></annotation>',
        "external.xml": '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                        '<annotation><filename>&e;</filename></annotation>',
        "parameter.xml": '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x.dtd"> %p;]>'
                         '<annotation/>',
        "dtd.xml": '<?xml version="1.0"?><!DOCTYPE annotation SYSTEM "http://127.0.0.1:9/a.dtd"><annotation>'
                   '<filename>a.png</filename></annotation>',
        "deep.xml": "<annotation>" + "<a>" * 100_000 + "</a>" * 100_000 + "</annotation>",
        "binary.xml": "\x00\xff\xfe<annotation>",
    }
    out = []
    for name, text in cases.items():
        (folder / name).write_text(text, errors="surrogateescape")
        out.append(("voc", folder / name, images))
    huge = folder / "huge.xml"
    with open(huge, "wb") as f:  # sparse: over the size cap without 65 MiB on disk
        f.truncate(65 << 20)
    out.append(("voc", huge, images))
    (folder / "bomb.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
        + "train: images\nnames: *i\n")
    (folder / "root.yaml").write_text("path: .\ntrain: ../../..\nval: /etc\nnames: [a]\n")
    (folder / "list.txt").write_text("/etc/passwd\n../../../../etc/hosts\nimages/a.png\n")
    (folder / "list.yaml").write_text("train: list.txt\nnames: [a]\n")
    (folder / "labels_dir").mkdir()
    (folder / "labels_dir" / "a.txt").mkdir()
    (folder / "labels_dir" / "b.txt").symlink_to("/dev/zero")
    out += [("yolo", folder / name, None) for name in ("bomb.yaml", "root.yaml", "list.yaml")]
    out.append(("yolo", folder / "labels_dir", images))
    return out


def _attempt(ann: Path, img_dir: Path | None, fmt: str, policy: RecordPolicy, split: str = "train") -> None:
    report = DropReport()
    fmt = detect_format(ann) if fmt == "auto" else fmt
    if fmt == "coco":
        return
    raw, folder = read_labels(ann, img_dir, fmt, split, policy, report)
    masks = policy.bad_mask == "drop" and fmt != "voc"  # VOC keeps no polygons: masks would always refuse
    dataset = CocoDetection(ann, folder, raw=raw, report=report, policy=policy, masks=masks)
    dataset.skip_unreadable = True
    for i in range(len(dataset)):
        dataset[i]
    dataset.coco_api()


def run_case(name: str, attempt, time_limit: float, outcomes: Counter, failures: list) -> None:
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Hang()))
    signal.setitimer(signal.ITIMER_REAL, time_limit)
    try:
        attempt()
        outcomes[(name, "ok")] += 1
    except UserError:
        outcomes[(name, "exit 2")] += 1
    except Hang:
        outcomes[(name, "HANG")] += 1
        failures.append((name, "hang"))
    except Exception:  # noqa: BLE001 - any other exception is the bug this script looks for
        outcomes[(name, "TRACEBACK")] += 1
        failures.append((name, traceback.format_exc()))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="Random cases per format.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=20.0)
    args = parser.parse_args()
    rng, outcomes, failures = random.Random(args.seed), Counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (fmt, ann, img_dir) in enumerate(_fixed_cases(Path(tmp) / "fixed")):
            run_case(f"fixed {ann.name}", lambda: _attempt(ann, img_dir, fmt, RecordPolicy()), args.time_limit,
                     outcomes, failures)
        for fmt in ("voc", "yolo", "labelme"):
            for i in range(args.count):
                folder = Path(tmp) / f"{fmt}{i}"
                ann, img_dir = _split(folder, fmt, rng)
                drop = rng.random() < 0.5
                policy = RecordPolicy(**{k: "drop" for k in POLICY_KINDS}) if drop else RecordPolicy()
                run_case(fmt, lambda: _attempt(ann, img_dir, rng.choice(["auto", fmt]), policy), args.time_limit,
                         outcomes, failures)
    for (name, outcome), n in sorted(outcomes.items()):
        print(f"{name:28s} {outcome:10s} {n}")
    for name, text in failures[:5]:
        print(f"--- {name}\n{text}")
    print(f"{len(failures)} failures (tracebacks or hangs)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
