"""Reading a COCO annotation file: the JSON parsed and its top level checked (images, annotations
and categories are lists; every category has a distinct integer id). What is inside images and
annotations is checked by the index (coco_index.py, records.py), record by record where needed.
"""

from __future__ import annotations

import contextlib
import gc
import json
from pathlib import Path

from rcnn_trainer.errors import UserError
from rcnn_trainer.input_limits import MAX_JSON_DEPTH, brief, check_nesting


def read_coco_json(ann_file: Path) -> dict:
    """Load and check the top-level structure of a COCO annotation file."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise UserError(f"annotation file '{ann_file}' does not exist.")
    data = _parse_json(ann_file)
    if not isinstance(data, dict):
        raise UserError(f"annotation file '{ann_file}' is not COCO format: the top level is a "
                        f"{type(data).__name__}, expected an object with images, annotations, categories.")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"annotation file '{ann_file}' is not COCO format: the key '{key}' "
                            f"is missing or not a list (found keys: {sorted(data)}).")
    if not data["categories"]:
        raise UserError(f"annotation file '{ann_file}': 'categories' is empty; a detector needs at least one class.")
    seen = set()
    for index, category in enumerate(data["categories"]):
        cat_id = category.get("id") if isinstance(category, dict) else None
        if type(cat_id) is not int or not -2**62 < cat_id < 2**62:
            raise UserError(f"annotation file '{ann_file}': categories[{index}] needs an integer 'id', got "
                            f"{brief(category)}.")
        if cat_id in seen:
            raise UserError(f"annotation file '{ann_file}': categories[{index}]: duplicate category id {cat_id}.")
        seen.add(cat_id)
    return data


def _parse_json(path: Path):
    """The standard library's parser. orjson parsed a COCO train2017-size file in 1.2 s instead of
    2.8 s but its peak memory was 0.26 GiB higher (it builds its own document first): 1.55x
    pycocotools' indexing memory, past the 1.5x we allow (docs/benchmarks.md)."""
    try:
        data = json.loads(path.read_bytes())
    except RecursionError:
        raise UserError(f"annotation file '{path}' nests lists or objects too deeply to read (hundreds of levels); "
                        f"no COCO file does.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"annotation file '{path}' is not valid JSON: {err}.") from None
    if isinstance(data, dict):  # the small parts whole; images and annotations are checked field by field
        for key, value in data.items():
            if key not in ("images", "annotations"):
                check_nesting(value, f"annotation file '{path}', key {brief(key)}", MAX_JSON_DEPTH, 10_000_000)
    return data


def hashable(value):
    """A json id as a dict key: lists and dicts (bad but possible) become their repr."""
    return value if isinstance(value, (int, str, float, type(None))) and not isinstance(value, bool) else repr(value)


@contextlib.contextmanager
def no_gc():
    """The cyclic GC paused while millions of json containers are made (its scans were half of
    the parse time); then they are frozen, so that no later full collection walks them again (it
    cost 0.4-0.6 s per collection on a COCO-size file). Plain json holds no cycles: reference
    counting still frees it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # Process-wide on purpose: CPython freezes every tracked object or none (there is no
        # per-object freeze), and the dataset keeps the parsed file (`raw`) for evaluation and
        # masks. Measured without the freeze on 200,000 annotations (issue 38): indexing 1.47 s
        # instead of 1.10 s (the first collection after gc.enable walks every new container), a
        # full collection 0.64 s instead of 0.15 s, the automatic ones during evaluation_json +
        # coco_api + 64 items 1.70 s instead of 0.52 s. DataLoader workers forked from here also
        # leave the frozen objects' pages shared. The cost: an object alive now that later becomes
        # part of an unreachable cycle is never collected (the json itself holds no cycles).
        gc.freeze()
        if enabled:
            gc.enable()
