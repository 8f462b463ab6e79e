"""logging.writers: what metrics.jsonl holds, read back through TensorBoard's own reader (and its
HTTP server) and the MLflow client from a local file store; a writer never stops a run."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcnn_trainer.infer.run_eval import run_evaluation
from rcnn_trainer.writers import PACKAGES, build_writers
from rcnn_trainer.writers.hub import Writers
from rcnn_trainer.writers.tags import split_record
from conftest import crashed_then_resumed, tiny_config

HAS_TB = all(__import__("importlib").util.find_spec(m) for m in ("tensorboard", "torch.utils.tensorboard"))
HAS_MLFLOW = __import__("importlib").util.find_spec("mlflow") is not None
needs_tb = pytest.mark.skipif(not HAS_TB, reason="tensorboard not installed (pip install '.[tensorboard]')")
needs_mlflow = pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow not installed (pip install '.[mlflow]')")


def event_reader(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    reader.Reload()
    return reader


def expected_scalars(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every number in metrics.jsonl, as the writers name them."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for line in metrics.read_text().splitlines():
        parts = split_record(json.loads(line))
        for tag, value in parts.scalars.items():
            expected.setdefault(tag, []).append((parts.step, value))
    return expected


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)  # TB stores float32


def test_record_tags_are_stable_and_safe_as_paths():
    train = split_record({"type": "train", "iter": 7, "loss": 2.5, "loss_roi_cls": 1.0, "loss_roi_cls_weighted": 2.0,
                          "avg_factor/roi_cls": 64.0, "lr": 0.01, "grad_norm": 3.0, "clipped": True, "time": 0.3})
    assert train.step == 7
    assert train.scalars == {"loss/total": 2.5, "loss/roi_cls": 1.0, "loss_weighted/roi_cls": 2.0,
                             "avg_factor/roi_cls": 64.0, "lr": 0.01, "grad_norm": 3.0, "clipped": 1.0, "time/iter": 0.3}
    ev = split_record({"type": "eval", "iter": 9, "AP": 0.5, "AP/../../etc": 0.25, "AP/cat dog:1": 0.1,
                       "dets@0.5": 3.0, "val/loss": 1.5, "gt_per_image": 2.0})
    assert ev.scalars == {"eval/AP": 0.5, "eval/AP_class/_/_/etc": 0.25, "eval/AP_class/cat_dog_1": 0.1,
                          "eval/dets_per_img/0.5": 3.0, "eval/val/loss": 1.5, "eval/gt_per_img": 2.0}
    alarm = split_record({"type": "alarm", "iter": 40, "name": "collapse", "seen": "dets 0.0", "why": "w",
                          "change": ["model.roi.cls_pos_weight: raise"]})
    assert alarm.scalars == {"alarm/collapse": 1.0}
    assert alarm.texts["alarms/collapse"].splitlines()[0] == "ALARM [collapse]"
    assert "change: model.roi.cls_pos_weight: raise" in alarm.texts["alarms/collapse"]


class Slow:
    """A writer that waits for `go` on its first call (a stalled server) and records what it got."""
    name = "slow"

    def __init__(self):
        self.go, self.steps = threading.Event(), []

    def open(self, resume_step):
        self.go.wait(10)

    def params(self, values, final_metrics):
        pass

    def scalars(self, step, values):
        self.steps.append(step)

    def text(self, tag, text, step):
        pass

    def flush(self):
        pass

    def close(self, status):
        pass


class Broken(Slow):
    name = "broken"

    def open(self, resume_step):
        raise OSError(28, "No space left on device")


def test_a_stalled_writer_drops_and_counts_and_a_failing_one_is_reported_once():
    said, slow = [], Slow()
    writers = Writers([slow, Broken()], say=said.append, queue_size=10, close_timeout_s=5)
    started = time.perf_counter()
    for i in range(200):
        writers.record({"type": "train", "iter": i, "loss": 1.0})
    per_call = (time.perf_counter() - started) / 200
    assert per_call < 1e-3  # the training thread never waits on a tracker (a step is ~0.3 s)
    assert writers.dropped >= 190
    slow.go.set()
    writers.close()
    assert slow.steps == list(range(len(slow.steps))) and 1 <= len(slow.steps) <= 10
    failures = [s for s in said if "broken failed" in s]
    assert len(failures) == 1 and "No space left on device" in failures[0]
    assert any("dropped" in s for s in said)


def test_a_missing_package_or_an_unreachable_server_is_reported_once_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(PACKAGES, "tensorboard", "no_such_package_for_rcnn_trainer")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_config(tmp_path, logging={"writers": ["tensorboard", "mlflow"],
                                         "mlflow": {"tracking_uri": f"http://127.0.0.1:{port}"}})
    said = []
    writers = build_writers(cfg, tmp_path / "run", said.append)
    for i in range(5):
        writers.record({"type": "train", "iter": i, "loss": 1.0})
    writers.close()
    assert len([s for s in said if "not installed" in s and "tensorboard" in s]) == 1
    if HAS_MLFLOW:
        assert len([s for s in said if "mlflow failed" in s]) == 1
        assert not (tmp_path / "run" / "mlflow_run.json").exists()


@needs_tb
def test_alarms_dashboard_pictures_and_scalars_over_tensorboards_http_api(tmp_path):
    from rcnn_trainer.writers.tensorboard_writer import TensorBoardWriter

    picture = tmp_path / "lr_find.png"
    Image.fromarray(np.full((12, 16, 3), 200, np.uint8)).save(picture)
    writers = Writers([TensorBoardWriter(tmp_path / "tb")], say=print, params={"solver.lr": 0.01})
    for i in (1, 2, 3):
        writers.record({"type": "train", "iter": i, "loss": 1.0 / i, "lr": 0.01})
    writers.record({"type": "alarm", "iter": 3, "name": "collapse", "seen": "s", "why": "w", "change": []})
    writers.text("monitor/dashboard", "---- monitor @ iter 3/3 ----", 3)
    writers.picture("pictures/lr_find", picture, 3)
    writers.close()
    reader = event_reader(tmp_path / "tb")
    assert [(e.step, e.value) for e in reader.Scalars("alarm/collapse")] == [(3, 1.0)]
    assert b"ALARM [collapse]" in reader.Tensors("alarms/collapse/text_summary")[0].tensor_proto.string_val[0]
    assert reader.Tensors("monitor/dashboard/text_summary")[0].step == 3
    assert (reader.Images("pictures/lr_find")[0].width, reader.Images("pictures/lr_find")[0].height) == (16, 12)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "tb"), "--host",
                               "127.0.0.1", "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base, tags = f"http://127.0.0.1:{port}/data/plugin/scalars", {}
        deadline = time.time() + 30
        while time.time() < deadline and "loss/total" not in tags.get(".", {}):
            try:
                tags = json.load(urllib.request.urlopen(f"{base}/tags", timeout=2))
            except OSError:
                time.sleep(0.2)
        assert {"loss/total", "lr", "alarm/collapse"} <= set(tags["."])
        query = urllib.parse.urlencode({"run": ".", "tag": "loss/total"})
        points = json.load(urllib.request.urlopen(f"{base}/scalars?{query}", timeout=5))
        assert [(step, round(value, 6)) for _, step, value in points] == [(1, 1.0), (2, 0.5), (3, 0.333333)]
    finally:
        server.terminate()
        server.wait(10)


@needs_tb
@needs_mlflow
def test_a_killed_and_resumed_run_reads_back_from_both_writers_as_in_metrics_jsonl(tmp_path, after_forward):
    from mlflow.tracking import MlflowClient

    # checkpoint at 2, killed in step 4 (after step 3 was logged), resumed from 2 to 4
    crashed_then_resumed(tmp_path, after_forward, crash_at=3, logging={"writers": ["tensorboard", "mlflow"]})
    run = tmp_path / "run"
    expected = expected_scalars(run / "metrics.jsonl")
    # rcnn-eval into the run folder's eval/ adds its metrics and drawings to the same runs
    cfg = tiny_config(tmp_path, logging={"writers": ["tensorboard", "mlflow"]})
    run_evaluation(cfg, run / "model_final.pth", run / "eval", visualize=2, progress=False, analyze=True)
    assert {"loss/total", "loss/roi_cls", "avg_factor/roi_cls", "lr", "grad_norm", "monitor/dets_per_img/0.5",
            "eval/AP", "eval/val/loss", "summary/AP"} <= expected.keys()
    assert any(tag.startswith("eval/AP_class/") for tag in expected)

    reader = event_reader(run / "tensorboard")
    for tag, points in expected.items():  # one value per step: the killed process's step 3 was purged
        got = [(e.step, e.value) for e in reader.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert all(close(a, b) for (_, a), (_, b) in zip(got, points)), tag
    assert [e.step for e in reader.Scalars("loss/total")] == [1, 2, 3, 4]  # one continuous curve
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        reader.SummaryMetadata("_hparams_/session_start_info").plugin_data.content).session_start_info.hparams
    assert hparams["solver.max_iters"].number_value == 4 and hparams["logging.mlflow.experiment"].string_value
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())
    assert [(e.step, round(e.value, 6)) for e in reader.Scalars("rcnn_eval/AP50")] == [(4, round(evaluated["AP50"], 6))]
    pictures = {tag for tag in reader.Tags()["images"]}
    assert {"pictures/eval/confusion_matrix", "pictures/eval/pr_curves"} <= pictures
    assert len([t for t in pictures if t.startswith("pictures/eval/vis/")]) == 2

    state = json.loads((run / "mlflow_run.json").read_text())
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    runs = client.search_runs([state["experiment_id"]])
    assert [r.info.run_id for r in runs] == [state["run_id"]]  # one MLflow run across the resume
    mlrun = runs[0]
    assert mlrun.info.run_name == "run" and mlrun.info.status == "FINISHED"
    assert mlrun.data.params["solver.max_iters"] == "4" and mlrun.data.params["logging.writers"] == str(
        ["tensorboard", "mlflow"])
    for tag, points in expected.items():
        history = client.get_metric_history(state["run_id"], tag)
        for step, value in points:  # the last value logged at each step is metrics.jsonl's
            at_step = [m.value for m in history if m.step == step]
            assert at_step and close(at_step[-1], value), (tag, step)
    artifacts = {a.path for a in client.list_artifacts(state["run_id"], "checkpoints")}
    assert artifacts == {"checkpoints/model_best.pth", "checkpoints/model_final.pth"}
    drawings = client.list_artifacts(state["run_id"], "pictures/eval/vis")
    assert len(drawings) == 2 and all(a.path.endswith(".png") for a in drawings)
    assert mlrun.info.status == "FINISHED" and client.get_metric_history(state["run_id"], "rcnn_eval/AP")[0].step == 4
    dashboards = client.list_artifacts(state["run_id"], "text/monitor/dashboard")
    assert [Path(a.path).name for a in dashboards] == ["00000002.txt", "00000004.txt"]


def test_logging_keys_are_checked(tmp_path):
    from rcnn_trainer.errors import UserError

    assert tiny_config(tmp_path).logging.writers == []  # off unless asked for
    for bad in ({"writers": ["tensorboard", "tensorboard"]}, {"writers": ["wandb"]}, {"queue_size": 0},
                {"mlflow": {"uri": "x"}}):
        with pytest.raises(UserError, match="logging"):
            tiny_config(tmp_path, logging=bad)
