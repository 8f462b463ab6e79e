"""The config schema: the root `Config`, composed of one Pydantic model per section of config.yaml.

Each section lives in the module named after it:
  data:            config_data.py    (DataConfig, BadRecordPolicy, the splits, synthetic)
  model:           config_model.py   (ModelConfig: backbone, anchors, rpn, roi, mask and their losses)
  solver:, train:  config_solver.py  (SolverConfig with ema, TrainConfig)
  monitor:         config_monitor.py (MonitorConfig and each check's limits)
  logging:         config_logging.py (LoggingConfig: TensorBoard / MLflow writers)
  tta:, the root   here
Every section's classes are importable from here too (`from rcnn_trainer.config import SolverConfig`).

Unknown keys are rejected (`extra="forbid"`). Defaults follow torchvision's / detectron2's
Faster R-CNN defaults. Only `build_*(cfg)` functions read these objects; modules take plain
keyword arguments. Loading YAML, `_base_` inheritance and overrides live in config_loader.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import Field

from rcnn_trainer.config_base import Strict
from rcnn_trainer.config_data import BadRecordPolicy, CocoSplit, DataConfig, SyntheticData
from rcnn_trainer.config_model import (AnchorConfig, BackboneConfig, BoxLossConfig, ClsLossConfig, MaskConfig,
                                       MaskLossConfig, ModelConfig, ROIConfig, RPNConfig, WeightRamp)
from rcnn_trainer.config_logging import LoggingConfig, MLflowConfig
from rcnn_trainer.config_monitor import CollapseConfig, MonitorConfig
from rcnn_trainer.config_solver import EMAConfig, SolverConfig, TrainConfig

__all__ = ["AnchorConfig", "BackboneConfig", "BadRecordPolicy", "BoxLossConfig", "ClsLossConfig", "CocoSplit",
           "CollapseConfig", "Config", "DataConfig", "EMAConfig", "MaskConfig", "MaskLossConfig", "ModelConfig",
           "MonitorConfig", "ROIConfig", "RPNConfig", "SolverConfig", "Strict", "SyntheticData", "TTAConfig",
           "TrainConfig", "WeightRamp", "LoggingConfig", "MLflowConfig"]


class TTAConfig(Strict):
    min_sizes: list[Annotated[int, Field(ge=8)]] = Field(
        default_factory=list, description="Short sides run besides data.min_size's evaluation size with --tta "
        "(e.g. [96, 160] around 128); [] = that size only.")
    flip: Union[bool, Literal["auto"]] = Field(
        "auto", description="Also run each size mirrored; auto = when training flipped (data.hflip_prob > 0), "
        "i.e. when the classes are left-right symmetric.")
    nms_thresh: Optional[float] = Field(None, ge=0.0, le=1.0, description="IoU of the per-class NMS that merges "
                                        "the passes (null = model.roi.nms_thresh).")


class Config(Strict):
    seed: int = Field(42, description="Seed for python, numpy, torch and the data order.")
    output_dir: Path = Field(Path("output"), description="Run folder: config, metrics.jsonl, checkpoints.")
    data: DataConfig
    model: ModelConfig
    solver: SolverConfig = Field(default_factory=SolverConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    tta: TTAConfig = Field(default_factory=TTAConfig)

    def with_settings(self, updates: dict) -> "Config":
        """A new, validated config with the dotted keys of `updates` set ("model.num_classes": 3);
        this one is left as it is (the user's config is never changed after validation)."""
        data = self.model_dump(mode="json")
        for dotted, value in updates.items():
            *sections, name = dotted.split(".")
            node = data
            for section in sections:
                node = node[section]
            node[name] = value
        return type(self).model_validate(data)
