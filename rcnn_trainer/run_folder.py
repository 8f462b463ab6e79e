"""Which folders a command may write into: the run folder belongs to its run.

A command writes only into a folder that is new, empty of what it writes, or one that an
rcnn_trainer command claimed before (it holds the marker `run.json`, written with O_EXCL when the
folder is claimed). A folder without the marker that already holds a file the command would
write is refused (exit 2, naming the files): it holds the user's work, not ours. A link where the
command writes is refused in any folder (`checkpoints` linked elsewhere would put them there).
Single output files (`rcnn-export --output`) are never replaced unless the user passes `--overwrite`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable

from rcnn_trainer.errors import UserError

MARKER = "run.json"
TOOL = "rcnn_trainer"
MAX_MARKER_BYTES = 64 * 1024  # the marker is ours and tiny; anything bigger is not ours

# what `rcnn-train` writes into its run folder (checked when the folder is not ours yet)
TRAIN_OUTPUTS = ("config.yaml", "metrics.jsonl", "checkpoints", "model_final.pth", "model_best.pth", "eval",
                 "lr_find.json", "lr_find.png", ".lock", "probe", "tensorboard", "mlruns", "mlflow_run.json")


def owned_by_us(folder: Path) -> bool:
    """True when `folder` holds a marker an rcnn_trainer command wrote (a plain file, not a link)."""
    marker = Path(folder) / MARKER
    try:
        if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > MAX_MARKER_BYTES:
            return False
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("tool") == TOOL


def claim_folder(folder: Path, command: str, outputs: Iterable[str], overwrite: bool = False,
                 hint: str = "choose a new or empty --output-dir") -> bool:
    """Make `folder` this command's, or refuse. Returns True if it was ours already.

    `outputs`: the names the command writes in it; in a folder that is not ours, any of them
    existing (a file, folder or link) is refused unless `overwrite` (the user said so)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output folder '{folder}' exists and is not a folder; {hint}.")
    # in our folder and with overwrite too: a link where we write (checkpoints/, vis/) takes the files elsewhere
    links = sorted(name for name in outputs if os.path.islink(folder / name))
    if links:
        raise UserError(f"output folder '{folder}' holds '{links[0]}' as a link (to '{os.readlink(folder / links[0])}'"
                        f"): {command} writes there and never through a link. Remove the link or choose another "
                        f"output folder.")
    if owned_by_us(folder):
        return True
    taken = sorted(name for name in outputs if os.path.lexists(folder / name))
    if os.path.lexists(folder / MARKER):
        taken.insert(0, MARKER)
    if taken and not overwrite:
        shown = ", ".join(f"'{name}'" for name in taken[:8]) + (f" and {len(taken) - 8} more" if len(taken) > 8 else "")
        raise UserError(f"output folder '{folder}' holds {shown}, which {command} would write, but "
                        f"rcnn_trainer did not create this folder (no {MARKER} of ours in it). Files it did not "
                        f"create are never overwritten: {hint}.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_marker(folder / MARKER, command)
    except FileExistsError:  # another process claimed it between our check and our write
        if not owned_by_us(folder):
            raise UserError(f"output folder '{folder}': '{MARKER}' appeared and is not ours; {hint}.") from None
    except OSError as err:
        raise UserError(f"output folder '{folder}' cannot be created or written: {err.strerror or err}; "
                        f"{hint}.") from None
    return False


def _write_marker(path: Path, command: str) -> None:
    """O_EXCL | O_NOFOLLOW: never through a planted link, never over an existing file."""
    if os.path.lexists(path) and owned_by_us(path.parent):
        return
    if os.path.lexists(path):  # only with overwrite: a foreign marker is replaced by ours
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"tool": TOOL, "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "pid": os.getpid()}, f)
        f.write("\n")


def refuse_existing_file(path: Path, overwrite: bool, option: str = "--overwrite") -> None:
    """A single output file named by the user: refused if something is there, unless `overwrite`."""
    if os.path.lexists(path) and not overwrite:
        raise UserError(f"'{path}' already exists: rcnn_trainer does not replace files it was not told to. "
                        f"Choose another path or pass {option}.")
    if os.path.lexists(path) and Path(path).is_dir():
        raise UserError(f"'{path}' is a folder; give a file path.")


def safe_name(value, limit: int = 80) -> str:
    """A file-name fragment for a name read from data (an image id, a file name, a class name):
    only letters, digits, '-', '_' and '.', never '.' or '..' alone, at most `limit` characters."""
    text = str(value)
    cleaned = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in text)[:limit]
    cleaned = cleaned.lstrip(".")
    return cleaned or "_"
