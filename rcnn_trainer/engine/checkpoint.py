"""Checkpoints: one plain dict, written atomically, read with a fallback.

A checkpoint holds model, optimizer, scheduler, scaler, iteration, RNG states and the
resolved config. It is written to a temporary file, fsynced and renamed, so a process killed
at any moment (SIGKILL included) leaves either the old set of files or the new one: never a
truncated file under a checkpoint's name.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from rcnn_trainer.errors import UserError, WriteFailed

PERIODIC = re.compile(r"^ckpt_(\d{7})\.pth$")
KILL_DURING_WRITE_ENV = "RCNN_TRAINER_TEST_KILL_DURING_CHECKPOINT"  # test hook: SIGKILL mid-write


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            if os.environ.get(KILL_DURING_WRITE_ENV) == path.name:
                os.kill(os.getpid(), 9)  # the file is half written and not yet renamed
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(f"could not write '{path}': {err}. The files written before it are intact; free space "
                          f"or fix the folder, then continue with --resume.") from None
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path) -> dict:
    """Load one checkpoint; a truncated or foreign file becomes a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # our own files: RNG states need pickle
    except Exception as err:  # noqa: BLE001 - any failure to read is a corrupt file
        raise UserError(f"checkpoint '{path}' is corrupt or truncated and cannot be loaded ({type(err).__name__}: "
                        f"{str(err)[:200]}).") from None
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
        except UserError as err:
            log(f"[resume] WARNING {err} Falling back to the previous checkpoint.")
    return None


def prune(folder: Path, keep: int) -> None:
    for path in periodic_checkpoints(folder)[keep:]:
        path.unlink(missing_ok=True)
    for stale in folder.glob(".ckpt_*.tmp-*"):
        stale.unlink(missing_ok=True)
