"""metrics.jsonl: one JSON object per line; every logged number goes here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch

from rcnn_trainer.atomic_io import append_line, atomic_write_text


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


def scalars_to_floats(values: dict) -> dict[str, float]:
    """Python floats for a dict of scalars (tensors or numbers), keeping the key order. The
    tensors come to the host in one copy: float(t) on each would be a device sync apiece."""
    tensors = [k for k, v in values.items() if torch.is_tensor(v)]
    host = dict(zip(tensors, torch.stack([values[k].detach().float().reshape(()) for k in tensors]).tolist())) \
        if tensors else {}
    return {k: host[k] if k in host else float(v) for k, v in values.items()}


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        # gets every record written (the experiment trackers of logging.writers, rcnn_trainer/writers/)
        self.listener: Optional[Callable[[dict], None]] = None
        # where this process's lines start: a resume that finds no checkpoint drops what came before
        self._start = self.path.stat().st_size if enabled and self.path.is_file() else 0

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({k: _plain(v) for k, v in record.items()})
        append_line(self.path, line)
        if self.listener is not None:
            self.listener(record)

    def truncate_after(self, iteration: int, final: bool = False) -> None:
        """On resume: drop lines logged after the checkpoint, so the log matches an uninterrupted run.
        `final`: the checkpoint is the last iteration's; its final evaluation and summary lines came
        after it (a run killed after them, or while writing them, runs that evaluation again)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                after_checkpoint = record.get("iter", 0) > iteration or (
                    final and record.get("iter") == iteration and record.get("type") in ("eval", "summary"))
                if not after_checkpoint:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def discard_earlier_runs(self) -> None:
        """Keep only the lines this process wrote (a run killed before its first checkpoint
        starts over from iteration 0, so its lines would otherwise appear twice)."""
        if not self.enabled or not self.path.is_file() or not self._start:
            return
        with open(self.path, "rb") as f:
            f.seek(self._start)
            mine = f.read()
        atomic_write_text(self.path, mine.decode("utf-8"))
        self._start = 0

    def read(self) -> list[dict]:
        """Every complete line; a line cut by a killed process is skipped."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records
