"""The `logging:` section: experiment trackers fed from the records of metrics.jsonl (rcnn_trainer/writers/).

metrics.jsonl stays the source of truth; a writer only copies its records elsewhere, off the
training thread, and a writer that fails is reported once and switched off (docs/writers.md).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from rcnn_trainer.config_base import Strict


class MLflowConfig(Strict):
    tracking_uri: Optional[str] = Field(
        None, description="Where runs go (a server http://host:5000, file:/path, databricks ...). null = the "
        "MLFLOW_TRACKING_URI environment variable, else a local file store `mlruns/` inside the run folder.")
    experiment: str = Field("rcnn_trainer", min_length=1, max_length=500,
                            description="MLflow experiment the run is filed under (created when missing).")
    log_checkpoints: bool = Field(True, description="Upload model_best.pth and model_final.pth as artifacts at "
                                  "the end of training (a copy of each: mind the store's disk).")


class LoggingConfig(Strict):
    writers: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers that get every metrics.jsonl record: tensorboard "
        "(event files in <output_dir>/tensorboard; pip extra `tensorboard`), mlflow (pip extra `mlflow`). "
        "[] = metrics.jsonl only.")
    queue_size: int = Field(10000, ge=10, le=10_000_000, description="Records waiting for the writers' thread; "
                            "when full, new ones are dropped and counted (training never waits on a tracker).")
    close_timeout_s: float = Field(30.0, ge=0.0, le=3600.0, description="At the end of a run, how long to wait "
                                   "for the writers to send what is queued (a slow server) before leaving it.")
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)

    @field_validator("writers")
    @classmethod
    def _each_once(cls, writers: list[str]) -> list[str]:
        doubled = sorted({w for w in writers if writers.count(w) > 1})
        if doubled:
            raise ValueError(f"names {', '.join(doubled)} more than once; list each writer once")
        return writers
