"""`rcnn-convert --to coco`: the COCO json of a VOC, YOLO or LabelMe split, for pycocotools and the
other tools that read COCO. It is the same dict training reads (data/labels/), written as it is:
image ids are the label files' names, file names are relative to the split's img_dir, VOC
`difficult` objects keep a `difficult: 1` key (and `iscrowd: 0`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rcnn_trainer.atomic_io import atomic_write_text
from rcnn_trainer.data.labels import DESCRIBED, detect_format, read_labels
from rcnn_trainer.data.records import DropReport, RecordPolicy
from rcnn_trainer.errors import UserError
from rcnn_trainer.run_folder import refuse_existing_file


def convert_to_coco(ann_file: Path, img_dir: Path | None, fmt: str, split: str, out: Path, *, overwrite: bool = False,
                    policy: RecordPolicy | None = None, say=print) -> dict:
    """Read the split's labels under `policy` (the config's data.bad_records, or the defaults) and
    write their COCO json to `out` (refused when it exists, unless `overwrite`). Returns the dict."""
    ann_file, out = Path(ann_file), Path(out)
    if not (ann_file.is_file() or ann_file.is_dir()):
        raise UserError(f"labels '{ann_file}' do not exist.")
    refuse_existing_file(out, overwrite)
    if os.path.lexists(out) and out.resolve() == ann_file.resolve():
        raise UserError(f"--output '{out}' is the labels file itself; write the COCO json elsewhere.")
    fmt = detect_format(ann_file) if fmt == "auto" else fmt
    if fmt == "coco":
        raise UserError(f"'{ann_file}' is a COCO json already; nothing to convert.")
    report = DropReport()
    raw, img_dir = read_labels(ann_file, img_dir, fmt, split, policy or RecordPolicy(), report)
    atomic_write_text(out, json.dumps(raw))
    say(f"[convert] {DESCRIBED[fmt]} '{ann_file}' -> '{out}': {len(raw['images'])} images, "
        f"{len(raw['annotations'])} objects, {len(raw['categories'])} classes; its file names are relative to "
        f"'{img_dir}' (use data.{split}.ann_file={out} data.{split}.img_dir={img_dir})")
    for line in report.lines():
        say(f"[convert]   dropped or noted: {line}")
    return raw
