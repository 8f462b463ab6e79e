"""Every output file is complete or absent after a SIGKILL: a kill between writing and renaming
leaves the previous file (or none) under the name, never a partial one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rcnn_trainer.atomic_io import append_line, atomic_write_text
from rcnn_trainer.train.metrics_log import MetricsLog

KILL_AT_FSYNC = """
import os, sys
from rcnn_trainer import atomic_io
os.fsync = lambda fd: os.kill(os.getpid(), 9)  # dies with the new bytes written but not renamed
atomic_io.atomic_write_text(sys.argv[1], "new " * 100000)
"""


@pytest.mark.parametrize("existing", [True, False])
def test_kill_mid_write_leaves_the_old_file_or_none(tmp_path, existing):
    target = tmp_path / "metrics.json"
    if existing:
        target.write_text('{"AP": 0.5}')
    proc = subprocess.run([sys.executable, "-c", KILL_AT_FSYNC, str(target)], capture_output=True)
    assert proc.returncode == -9
    if existing:
        assert json.loads(target.read_text()) == {"AP": 0.5}
    else:
        assert not target.exists()


def test_written_file_is_complete_and_no_temporary_is_left(tmp_path):
    atomic_write_text(tmp_path / "a" / "predictions.json", json.dumps([1, 2, 3]))
    assert json.loads((tmp_path / "a" / "predictions.json").read_text()) == [1, 2, 3]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["predictions.json"]


def test_metrics_lines_are_whole_and_a_cut_line_is_skipped_then_dropped_on_resume(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for i in range(3):
        log.write({"iter": i, "loss": 1.0 / (i + 1)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iter": 3, "lo')  # what a kill inside a multi-syscall write would leave
    assert [r["iter"] for r in log.read()] == [0, 1, 2]
    log.truncate_after(2)
    append_line(tmp_path / "metrics.jsonl", json.dumps({"iter": 3}))
    assert [r["iter"] for r in log.read()] == [0, 1, 2, 3]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 4
