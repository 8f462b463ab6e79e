"""Limits on what a parser accepts: nesting depth, node count (with YAML aliases counted each
time they are used) and file size, each refused as a UserError naming the file.

Python's parsers and everything that walks their output (deep merges, Pydantic, repr in a
message) recurse, so a deeply nested value ended in a RecursionError traceback; a YAML alias
bomb ("billion laughs") builds quickly but explodes when merged or validated. Checking the
parsed value once, iteratively, with a budget on the nodes visited, bounds both.
"""

from __future__ import annotations

import reprlib
from pathlib import Path

from rcnn_trainer.errors import UserError

MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; 1 MiB leaves room for long class lists
MAX_CONFIG_DEPTH = 24  # config.yaml's deepest key is 5 levels down
MAX_CONFIG_NODES = 200_000  # values visited, aliases expanded; config.yaml has about 300
MAX_BASE_DEPTH = 16  # _base_ chains
MAX_BASE_FILES = 64  # distinct files in one config's _base_ graph
MAX_JSON_DEPTH = 32  # COCO's deepest value (a polygon's coordinates) is 5 levels down
MAX_LABEL_FILE_BYTES = 64 << 20  # one VOC / YOLO / LabelMe file (LabelMe may embed its image as base64)
MAX_XML_DEPTH = 16  # a VOC file's deepest element (annotation/object/bndbox/xmin) is 4 levels down

_brief = reprlib.Repr()
_brief.maxlevel, _brief.maxstring, _brief.maxother, _brief.maxlist, _brief.maxdict = 3, 60, 60, 6, 6


def brief(value) -> str:
    """A short repr for a message: bounded in depth and length whatever the value holds."""
    return _brief.repr(value)


def check_nesting(value, where: str, max_depth: int, max_nodes: int | None = None, what: str = "value") -> None:
    """Walk `value` without recursion; a UserError naming `where` if it nests deeper than
    `max_depth` or visits more than `max_nodes` values (shared references counted each time)."""
    stack = [(value, 1)]
    visited = 0
    while stack:
        node, depth = stack.pop()
        visited += 1
        if max_nodes is not None and visited > max_nodes:
            raise UserError(f"{where}: the {what} holds more than {max_nodes:,} values (with YAML aliases "
                            f"expanded). Such a file is refused: a few repeated anchors can expand into billions "
                            f"of values.")
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if depth >= max_depth and len(children):
            raise UserError(f"{where}: the {what} nests deeper than {max_depth} levels; no valid input "
                            f"does. Flatten it or remove the nested value.")
        stack.extend((child, depth + 1) for child in children)


def check_file_size(path: Path, limit: int, what: str, key: str | None = None) -> None:
    size = Path(path).stat().st_size
    if size > limit:
        raise UserError(f"{what} '{path}' is {size / 2**20:,.1f} MiB, over the limit of {limit / 2**20:,.0f} MiB"
                        + (f" (raise {key})." if key else "."))
