"""Checkpoints: one plain dict, written atomically, read with a fallback.

A checkpoint holds model, optimizer, scheduler, scaler, iteration, RNG states and the
resolved config, all as tensors and plain Python values, so every file is read with
`torch.load(weights_only=True)`: a checkpoint is data, and one that would need to run code to be
unpickled (a file from a colleague or a web page can carry such a payload) is refused, never
unpickled. It is written to a temporary file, fsynced and renamed, so a process killed
at any moment (SIGKILL included) leaves either the old set of files or the new one: never a
truncated file under a checkpoint's name.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from rcnn_trainer.atomic_io import atomic_write
from rcnn_trainer.errors import UnsafeFile, UserError, WriteFailed
from rcnn_trainer.safe_load import load_weights_only

PERIODIC = re.compile(r"^ckpt_(\d{7})\.pth$")


def rng_state() -> dict:
    """Every RNG's state as plain values and tensors (weights-only loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], np.asarray(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(obj: dict, path: Path) -> None:
    """torch.save through atomic_io; a full disk or unwritable folder is a WriteFailed naming the file."""
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except OSError as err:
        raise WriteFailed(f"could not write '{path}': {err}. The files written before it are intact; free space "
                          f"or fix the folder, then continue with --resume.") from None


def load_checkpoint(path: Path) -> dict:
    """Load one checkpoint; a truncated, foreign or code-carrying file becomes a UserError naming it."""
    path = Path(path)
    ckpt = load_weights_only(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"checkpoint '{path}' is not an rcnn_trainer checkpoint (no 'model' entry).")
    return ckpt


def periodic_checkpoints(folder: Path) -> list[Path]:
    """Periodic checkpoints in the folder, newest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PERIODIC.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_latest(folder: Path, log=print) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads; corrupt ones are reported and skipped."""
    for path in periodic_checkpoints(folder):
        try:
            return load_checkpoint(path), path
        except UnsafeFile:
            raise  # a planted file in the run folder is not a crash to recover from
        except UserError as err:
            log(f"[resume] WARNING {err} Falling back to the previous checkpoint.")
    return None


def prune(folder: Path, keep: int) -> None:
    for path in periodic_checkpoints(folder)[keep:]:
        path.unlink(missing_ok=True)
    # temporaries a killed write left (atomic_io's names; `.tmp-<pid>` from older versions)
    for stale in [*folder.glob(".ckpt_*.tmp"), *folder.glob(".ckpt_*.tmp-*")]:
        stale.unlink(missing_ok=True)
