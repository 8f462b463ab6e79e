"""MLflow: one MLflow run per run folder, through MlflowClient (no global "active run" state).

The run is named after the output folder; its id is kept in <run folder>/mlflow_run.json, so a
resumed run logs into the same MLflow run. Tracking URI: logging.mlflow.tracking_uri, else the
MLFLOW_TRACKING_URI environment variable, else a file store `mlruns/` inside the run folder
(MLflow 3 keeps its file store in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE
is set: for that default, and only then, it is set for this process).

MLflow cannot delete metric points: steps that a killed process logged after its last
checkpoint stay, and the resumed process logs those steps again (TensorBoard purges them).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rcnn_trainer.atomic_io import atomic_write_text

STATE_FILE = "mlflow_run.json"
MAX_STATE_BYTES = 64 * 1024
BATCH = 500  # metrics per log_batch call (MLflow's limit is 1000 metrics, 100 params)
PARAM_BATCH = 100
PARAM_CHARS = 6000  # MLflow's limit on a param value


def default_tracking_uri(run_folder: Path, configured: str | None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_folder).resolve() / "mlruns").as_uri()


def read_state(path: Path) -> dict:
    """The run id an earlier process of this run folder stored; {} when none (or not ours)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_STATE_BYTES:
            return {}
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return state if isinstance(state, dict) and isinstance(state.get("run_id"), str) else {}


class MLflowWriter:
    name = "mlflow"

    def __init__(self, run_folder: Path, tracking_uri: str | None, experiment: str):
        self.run_folder = Path(run_folder)
        self.uri = default_tracking_uri(run_folder, tracking_uri)
        self.experiment = experiment
        self.run_id: str | None = None
        self._client = None
        self._adding = False

    def open(self, resume_step: int | None) -> None:
        """`resume_step`: the checkpoint's iteration (0: a new MLflow run), None: the run folder's run (rcnn-eval)."""
        if self.uri == (self.run_folder.resolve() / "mlruns").as_uri():
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # our default store, see the docstring
        from mlflow.tracking import MlflowClient  # needs the `mlflow` (or mlflow-skinny) package

        self._client = client = MlflowClient(tracking_uri=self.uri)
        self._adding = resume_step is None  # rcnn-eval adds to the run and leaves its status as it is
        state_path = self.run_folder / STATE_FILE
        earlier = read_state(state_path) if resume_step != 0 else {}
        if earlier.get("tracking_uri") == self.uri:
            self.run_id = earlier["run_id"]
            if not self._adding:
                client.update_run(self.run_id, status="RUNNING")
            return
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
        self.run_id = client.create_run(experiment_id, run_name=self.run_folder.resolve().name).info.run_id
        atomic_write_text(state_path, json.dumps({"run_id": self.run_id, "tracking_uri": self.uri,
                                                  "experiment_id": experiment_id}) + "\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(tag, value, stamp, step) for tag, value in values.items()]
        for start in range(0, len(metrics), BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[start:start + BATCH])

    def text(self, tag: str, text: str, step: int) -> None:
        self._client.log_text(self.run_id, text, f"text/{tag}/{step:08d}.txt")

    def picture(self, tag: str, path: Path, step: int) -> None:
        self._client.log_artifact(self.run_id, str(path), tag.rsplit("/", 1)[0] if "/" in tag else None)

    def params(self, values: dict[str, str], final_metrics: dict[str, float]) -> None:
        from mlflow.entities import Param

        if self._client.get_run(self.run_id).data.params:
            return  # a resumed run has them: MLflow refuses to change a logged param
        params = [Param(key, str(value)[:PARAM_CHARS]) for key, value in values.items()]
        for start in range(0, len(params), PARAM_BATCH):
            self._client.log_batch(self.run_id, params=params[start:start + PARAM_BATCH])

    def artifact(self, path: Path, folder: str) -> None:
        self._client.log_artifact(self.run_id, str(path), folder or None)

    def flush(self) -> None:
        """Each call above is sent (or written) when it returns."""

    def close(self, status: str) -> None:
        if self._client is not None and self.run_id is not None and not self._adding:
            self._client.set_terminated(self.run_id, status)
