"""Generated bad input for the real loaders: COCO files and configs mutated by hypothesis.

Each case must either load or raise UserError (exit 2 with a message that names the file);
anything else is a bug. A COCO case also reads nothing outside its folder and changes nothing
(tests/fs_guard.py). `mutated(valid)` is a hypothesis strategy (so a failing case shrinks to its
smallest edit), shared by the derandomized subsets in tests/test_fuzz.py and
tests/test_hostile_inputs.py and by tools/fuzz_inputs.py and tools/hostile_inputs.py (thousands).

Besides wrong types and values, an edit can nest a value thousands of levels deep, make it huge
(a long list, object or string) or put a path-like string ("../../x", "/etc/passwd", a NUL,
...) where an id, file name or class name goes. Deep and huge values are `Raw` nodes, written as
text: the json and yaml writers recurse and would refuse what is being tested.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path

import numpy as np
from fs_guard import changes, guarded, snapshot, under
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
# where ids, file names and class names go, and the config's paths
PATH_KEYS = ("file_name", "id", "image_id", "category_id", "name", "supercategory", "output_dir", "ann_file",
             "img_dir", "weights", "init_from", "probe_images")
PATH_LIKE = ["../../x", "/etc/passwd", "a/b", "..", ".", "x\x00y", "C:\\x", "~/x", "%2e%2e/x", "../outside/secret.png",
             "im1.png/../../im1.png", "./im1.png", "a/../im1.png", "/", "//", "\\\\server\\share\\x",
             "file:///etc/passwd", "x" * 300, "x" * 5000, "é" * 200, "\u202egnp.exe", "🙂", "con", "NUL", "-rf", " ",
             "\n", "$HOME/x", "$(touch pwned)", "x/" * 100, "../" * 50 + "etc/passwd", "im1.png\x00.jpg",
             "/dev/zero", "/proc/self/mem", "im1.png/", "IM1.PNG", "im1.png ", "*", "[a-z]*"]
PATH_LIKE_TEXT = st.one_of(
    st.sampled_from(PATH_LIKE),
    st.lists(st.sampled_from(["..", ".", "x", "ü", "", "~", "%2e%2e", "im1.png", "\\", " ", "\x00", "outside"]),
             min_size=1, max_size=8).map("/".join),
    st.lists(st.sampled_from(["..", "etc", "passwd", "tmp"]), min_size=1, max_size=6).map(
        lambda parts: "/" + "/".join(parts)))
VALUE_EDITS = ("replace", "delete", "add_key", "duplicate", "nest")
EDITS = (*VALUE_EDITS, "deepen", "huge", "path_like")


class Raw:
    """A value written as the given json text (json is also yaml's flow style): a few thousand
    levels of nesting, or a list, object or string too large to build as Python values each time."""

    def __init__(self, text: str, note: str):
        self.text, self.note = text, note

    def __repr__(self) -> str:  # what a failing case prints
        return f"Raw({self.note})"

    def __deepcopy__(self, memo):
        return self


def deepened(value, levels: int, kinds: str) -> Raw:
    """`value` wrapped in `levels` lists ('['), objects ('{') or both alternating."""
    opens = [("[", "]") if kinds == "[" or (kinds == "[{" and i % 2) else ('{"v": ', "}") for i in range(levels)]
    return Raw("".join(o for o, _ in opens) + to_json_text(value) + "".join(c for _, c in reversed(opens)),
               f"{brief(value)} in {levels} levels of {kinds}")


def huge(value, size: int, form: str, max_chars: int) -> Raw:
    """A list of `size` copies of `value`, an object of `size` keys, or a string of `size` characters;
    fewer where the text would pass `max_chars` (a huge list of huge lists would not fit in memory)."""
    if form == "list":
        item = to_json_text(value)
        size = max(1, min(size, max_chars // (len(item) + 1)))
        return Raw("[" + ",".join([item] * size) + "]", f"list of {size} x {brief(value)}")
    if form == "object":
        return Raw("{" + ",".join(f'"k{i}": 0' for i in range(size)) + "}", f"object of {size} keys")
    unit = str(value)[:8] or "x"
    return Raw(json.dumps((unit * (size // len(unit) + 1))[:size]), f"string of {size} x {unit!r}")


def brief(value) -> str:
    text = repr(value)
    return text if len(text) < 40 else text[:37] + "..."


@st.composite
def mutated(draw, valid, max_steps: int = 6, max_size: int = 2000, edits: tuple = EDITS):
    """`valid` after 1..max_steps edits, each at a drawn place: a value replaced by an odd one (wrong
    type, huge, negative, NaN, unicode), a key or item deleted, a key added, an item duplicated
    (duplicate ids), a value nested in a list or dict, wrapped in 2..5,000 levels (deepen), made
    huge (a list, object or string of up to `max_size` items, at most 20 characters an item), or,
    at an id, file name or name, a path-like string. PyYAML's pure-Python parser reads about 25,000
    list items a second: configs keep the default, COCO files (json) take 100,000. `edits`: the
    kinds drawn from (VALUE_EDITS: wrong values only; the deep ones cost up to ~2 s a config)."""
    data = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, max_steps))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        edit = draw(st.sampled_from(edits))
        named = [p for p in paths if p[-1] in PATH_KEYS]
        path = draw(st.sampled_from(named if edit == "path_like" and named else paths))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        key = path[-1]
        # copies: a drawn value can be a module constant (ODD_VALUES), and a later edit must not change it
        if edit == "replace":
            parent[key] = copy.deepcopy(draw(ODD_VALUE))
        elif edit == "delete":
            del parent[key]
        elif edit == "add_key" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "id", "bbox", "ü", "iscrowd"]))] = copy.deepcopy(draw(ODD_VALUE))
        elif edit == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        elif edit == "deepen":  # around the limits (24 and 32 levels) often, up to past the parsers' recursion
            levels = draw(st.one_of(st.integers(2, 40), st.integers(2, 5000)))
            parent[key] = deepened(parent[key], levels, draw(st.sampled_from(["[", "{", "[{"])))
        elif edit == "huge":
            size = draw(st.one_of(st.integers(100, max(100, max_size // 100)), st.integers(100, max_size)))
            parent[key] = huge(parent[key], size, draw(st.sampled_from(["list", "object", "string"])), 20 * max_size)
        elif edit == "path_like":
            parent[key] = draw(PATH_LIKE_TEXT)
        else:
            parent[key] = [parent[key]] if draw(st.booleans()) else {"v": parent[key]}
    return data


def _placeholders(node, raws: list):
    if isinstance(node, Raw):
        raws.append(node)
        return f"zzraw{len(raws) - 1}zz"
    if isinstance(node, dict):
        return {k: _placeholders(v, raws) for k, v in node.items()}
    if isinstance(node, list):
        return [_placeholders(v, raws) for v in node]
    return node


def to_json_text(data) -> str:
    raws: list[Raw] = []
    text = json.dumps(_placeholders(data, raws), allow_nan=True)
    return re.sub(r'"zzraw(\d+)zz"', lambda m: raws[int(m.group(1))].text, text) if raws else text


def to_yaml_text(data) -> str:
    import yaml

    raws: list[Raw] = []
    text = yaml.safe_dump(_placeholders(data, raws), allow_unicode=True)
    return re.sub(r"\bzzraw(\d+)zz\b", lambda m: raws[int(m.group(1))].text, text) if raws else text


DROP_ALL = {policy: "drop" for policy in ("missing_image", "unknown_category", "degenerate_box", "box_outside_image",
                                          "non_finite_box", "bad_mask", "unsafe_path")}


def try_coco(data, folder: Path, drop: bool = False) -> str:
    """'loaded' or 'user_error'; any other exception propagates (a bug), as does an error message
    that does not name the file or the image it is about, an image record whose path leads out of
    `folder` (the img_dir), a file read or listed outside it, or any file written or changed.
    `drop`: every data.bad_records policy 'drop' (the default stops at the first bad record)."""
    from rcnn_trainer.data.coco import CocoDetection, RecordPolicy
    from rcnn_trainer.errors import UserError

    path = folder / "fuzz.json"
    path.write_text(to_json_text(data) if not isinstance(data, str) else data, encoding="utf-8", errors="surrogatepass")
    before = snapshot(folder)
    outcome, dataset = "loaded", None
    with guarded(writable=(), readable=(folder,)) as guard:
        try:
            dataset = CocoDetection(path, folder, check_images="all", policy=RecordPolicy(**DROP_ALL) if drop else None)
            for i in range(len(dataset)):
                dataset[i]
            dataset.coco_api()  # what evaluation builds from the file
            _ = dataset.file_boxes  # what the preflight judges
        except UserError as err:
            assert str(folder) in str(err), f"the message does not name the file or image: {err}"
            outcome = "user_error"
    assert not guard.violations, guard.violations[:3]
    for record in dataset.records if dataset is not None else ():
        assert under(os.path.normpath(record.file), os.path.normpath(folder)), f"outside img_dir: {record.file!r}"
    assert not changes(before, snapshot(folder)), changes(before, snapshot(folder))
    return outcome


def valid_config(folder: Path) -> dict:
    import yaml

    raw = yaml.safe_load(Path(__file__).resolve().parents[1].joinpath("config.yaml").read_text())
    raw["output_dir"] = str(folder / "run")
    return raw


def try_config(raw, folder: Path) -> str:
    """Write the config as YAML and load it through load_config: 'loaded' or 'user_error'."""
    from rcnn_trainer.config_loader import load_config
    from rcnn_trainer.errors import UserError

    path = folder / "fuzz.yaml"
    path.write_text(to_yaml_text(raw), encoding="utf-8", errors="surrogatepass")
    try:
        cfg = load_config(path)
        cfg.model_dump()
    except UserError as err:
        assert path.name in str(err), f"the message does not name the config file: {err}"
        return "user_error"
    return "loaded"
