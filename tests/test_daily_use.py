"""Daily use: rcnn-predict on images a test writes, overrides anywhere among the options, and
one writer per run folder."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_dict, write_yaml
from rcnn_trainer.cli import predict_main, train_main
from rcnn_trainer.train.run_lock import RunLock


def test_predict_on_files_folders_and_globs(trained, tmp_path, capsys):
    config, checkpoint = trained
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (90, 70)), ("b.jpg", (64, 64)), ("c.png", (50, 120))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "pred"
    code = predict_main(["--config", str(config), "--checkpoint", str(checkpoint), str(folder / "a.png"),
                         str(folder / "*.jpg"), "--score-thresh", "0.0", "--output-dir", str(out), str(folder),
                         "--no-progress"])
    assert code == 0
    results = json.loads((out / "predictions.json").read_text())
    assert {r["file_name"] for r in results} <= {str(folder / n) for n in ("a.png", "b.jpg", "c.png")}
    assert results and all(r["category_id"] in (1, 2, 3, 4) and r["category_name"] in
                           ("square", "circle", "triangle", "cross") for r in results)
    sizes = {"a.png": (90, 70), "b.jpg": (64, 64), "c.png": (50, 120)}
    for r in results:  # boxes in original image pixels
        w, h = sizes[r["file_name"].rsplit("/", 1)[1]]
        x, y, bw, bh = r["bbox"]
        assert -0.5 <= x and x + bw <= w + 0.5 and -0.5 <= y and y + bh <= h + 0.5
    drawn = sorted(p.name for p in (out / "vis").iterdir())
    assert len(drawn) == 3 and min(Image.open(out / "vis" / drawn[0]).size) >= 512  # upscaled to be legible
    printed = capsys.readouterr().out
    assert "skipped" in printed and "broken.png" in printed and "1 unreadable images skipped" in printed
    # a second run into the same folder keeps the first results
    before = (out / "predictions.json").read_bytes()
    assert predict_main(["--config", str(config), "--checkpoint", str(checkpoint), str(folder / "a.png"),
                         "--output-dir", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "predictions.json").read_bytes() == before


def test_predict_into_an_unwritable_folder_is_exit_2(trained, tmp_path, capsys):
    config, checkpoint = trained
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    (tmp_path / "file").write_text("a file, not a folder")
    assert predict_main(["--config", str(config), "--checkpoint", str(checkpoint), str(tmp_path / "a.png"),
                         "--output-dir", str(tmp_path / "file" / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot write predictions to --output-dir" in err and "Traceback" not in err


def test_predict_nothing_readable_is_exit_2(trained, tmp_path, capsys):
    config, checkpoint = trained
    (tmp_path / "x.png").write_bytes(b"junk")
    assert predict_main(["--config", str(config), "--checkpoint", str(checkpoint), str(tmp_path / "x.png"),
                         "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "none of the 1 input images could be read" in capsys.readouterr().err
    assert predict_main(["--config", str(config), "--checkpoint", str(checkpoint), str(tmp_path / "nope*.png"),
                         "--no-progress"]) == 2


def test_overrides_anywhere_among_options(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", tiny_dict(tmp_path))
    code = train_main(["--config", str(config), "solver.max_iters=1", "--output-dir", str(tmp_path / "o"),
                       "monitor.probe_images=1", "--no-progress"])
    assert code == 0 and (tmp_path / "o" / "model_final.pth").is_file()
    # a misspelt key after an option is still found and named
    assert train_main(["--config", str(config), "model.rpn.cls_pos_wieght=2.0", "--output-dir", str(tmp_path / "p"),
                       "solver.max_iters=1"]) == 2
    assert "Did you mean 'cls_pos_weight'" in capsys.readouterr().err


HOLD_LOCK = """
import sys, time
from rcnn_trainer.train.run_lock import RunLock
from rcnn_trainer.run_folder import claim_folder
claim_folder(sys.argv[1], "rcnn-train", ())  # as a run does before it locks
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_second_writer_exits_2_naming_the_pid_and_a_dead_holder_does_not_block(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = write_yaml(tmp_path / "c.yaml", tiny_dict(tmp_path))
        assert train_main(["--config", str(config), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"in use by another run (pid {holder.pid}" in err
        assert not (run_dir / "metrics.jsonl").exists()  # nothing written by the refused run
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with RunLock(run_dir):  # the kernel released the killed process's lock
        pass
