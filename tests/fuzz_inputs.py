"""Generated bad input for the real loaders: COCO files and configs mutated by hypothesis.

Each case must either load or raise UserError (exit 2 with a message that names the file);
anything else is a bug. `mutated(valid)` is a hypothesis strategy (so a failing case shrinks to
its smallest edit), shared by the derandomized subset in tests/test_fuzz.py and by
tools/fuzz_inputs.py (thousands).
"""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from PIL import Image

ODD_VALUES = [None, "x", "", "ünïcødé", -1, 0, 1, 2**63, -2**63, 1e308, -1e308, math.nan, math.inf, True, False,
              [], {}, [1, 2], {"a": 1}, [[1, 2, 3]], 0.5, "7", [None] * 4]


def valid_coco(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    for i in (1, 2, 3):
        if not (folder / f"im{i}.png").exists():
            Image.fromarray(np.full((30, 40, 3), 100, np.uint8)).save(folder / f"im{i}.png")
    return {
        "images": [{"id": i, "file_name": f"im{i}.png", "width": 40, "height": 30} for i in (1, 2, 3)],
        "annotations": [{"id": k, "image_id": 1 + k % 3, "category_id": (7, 3)[k % 2], "bbox": [2, 3, 10, 8],
                         "area": 80, "iscrowd": 0, "segmentation": [[2, 3, 12, 3, 12, 11]]} for k in range(1, 7)],
        "categories": [{"id": 7, "name": "a", "supercategory": "s"}, {"id": 3, "name": "b", "supercategory": "s"}],
    }


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


ODD_VALUE = st.one_of(st.sampled_from(ODD_VALUES), st.none(), st.booleans(), st.integers(),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                      st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=3)), max_size=5),
                      st.dictionaries(st.text(max_size=4), st.integers(), max_size=3))
EDITS = ("replace", "delete", "add_key", "duplicate", "nest")


@st.composite
def mutated(draw, valid, max_steps: int = 6):
    """`valid` after 1..max_steps edits, each at a drawn place: a value replaced by an odd one (wrong
    type, huge, negative, NaN, unicode), a key or item deleted, a key added, an item duplicated
    (duplicate ids), a value nested in a list or dict."""
    data = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, max_steps))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        key, edit = path[-1], draw(st.sampled_from(EDITS))
        # copies: a drawn value can be a module constant (ODD_VALUES), and a later edit must not change it
        if edit == "replace":
            parent[key] = copy.deepcopy(draw(ODD_VALUE))
        elif edit == "delete":
            del parent[key]
        elif edit == "add_key" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "id", "bbox", "ü", "iscrowd"]))] = copy.deepcopy(draw(ODD_VALUE))
        elif edit == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        else:
            parent[key] = [parent[key]] if draw(st.booleans()) else {"v": parent[key]}
    return data


def try_coco(data, folder: Path) -> str:
    """'loaded' or 'user_error'; any other exception propagates (a bug), as does an error message
    that does not name the file or the image it is about."""
    from rcnn_trainer.data.coco import CocoDetection
    from rcnn_trainer.errors import UserError

    path = folder / "fuzz.json"
    path.write_text(json.dumps(data, allow_nan=True) if not isinstance(data, str) else data)
    try:
        dataset = CocoDetection(path, folder, check_images="all")
        for i in range(len(dataset)):
            dataset[i]
        dataset.coco_api()  # what evaluation builds from the file
    except UserError as err:
        assert str(folder) in str(err), f"the message does not name the file or image: {err}"
        return "user_error"
    return "loaded"


def valid_config(folder: Path) -> dict:
    import yaml

    raw = yaml.safe_load(Path(__file__).resolve().parents[1].joinpath("config.yaml").read_text())
    raw["output_dir"] = str(folder / "run")
    return raw


def try_config(raw, folder: Path) -> str:
    """Write the config as YAML and load it through load_config: 'loaded' or 'user_error'."""
    import yaml

    from rcnn_trainer.config_loader import load_config
    from rcnn_trainer.errors import UserError

    path = folder / "fuzz.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    try:
        cfg = load_config(path)
        cfg.model_dump()
    except UserError as err:
        assert path.name in str(err), f"the message does not name the config file: {err}"
        return "user_error"
    return "loaded"
