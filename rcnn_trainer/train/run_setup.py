"""Building a training run: datasets and their `auto` settings, preflight, model, AMP,
optimizer, resume and the probe set, gathered in one `Run` that the loop in trainer.py reads:
its data (`RunData`) and what training updates (`TrainingParts`) are grouped apart.

The user's config is not changed: `Run.cfg` is the resolved copy (auto settings and
`solver.max_epochs` filled in), saved as the run folder's config.yaml and in every checkpoint.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from rcnn_trainer.config import Config
from rcnn_trainer.config_loader import config_to_dict, save_config
from rcnn_trainer.data.coco import CocoDetection
from rcnn_trainer.data.loader import build_eval_loader
from rcnn_trainer.data.summary import format_summary, summarize_dataset
from rcnn_trainer.data.repeat_factors import drawn_object_counts
from rcnn_trainer.runtime import checkpoint as ckpt_io
from rcnn_trainer.data.settings import prepare_datasets
from rcnn_trainer.data.tiled_dataset import tiled_val_loader
from rcnn_trainer.train.ema import WeightAverage
from rcnn_trainer.runtime.device import (amp_dtype, amp_summary, autocast_for, device_kind, grad_scaler_for,
                                        pick_device, use_channels_last)
from rcnn_trainer.runtime.distributed import DistInfo, all_gather_objects, init_distributed
from rcnn_trainer.infer.evaluate import evaluate, format_metrics
from rcnn_trainer.infer.sliced import sliced_eval
from rcnn_trainer.train.metrics_log import MetricsLog
from rcnn_trainer.train.optim import build_optimizer, build_scheduler
from rcnn_trainer.train.resume import compare_resume_config
from rcnn_trainer.train.val_loss import val_loss_loader, validation_losses
from rcnn_trainer.losses.weighting import LossWeights, short_name
from rcnn_trainer.model.backbone_families import norm_note
from rcnn_trainer.model.init_from import initialize_from
from rcnn_trainer.errors import UserError
from rcnn_trainer.run_folder import TRAIN_OUTPUTS, claim_folder, owned_by_us
from rcnn_trainer.model.build import build_loss_weights, build_model
from rcnn_trainer.model.detector import TwoStageDetector
from rcnn_trainer.monitor.alarms import Alarm
from rcnn_trainer.monitor.health import HealthMonitor, build_health_monitor
from rcnn_trainer.monitor.preflight import preflight_from_config, raise_on_errors
from rcnn_trainer.monitor.threshold_counts import format_threshold_table
from rcnn_trainer.writers import Writers, build_writers


@dataclass
class TrainState:
    """What a checkpoint carries about the loop itself (saved as a plain dict)."""
    iteration: int = 0
    best_ap: float = -1.0
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    amp_overflows: int = 0  # fp16 steps the GradScaler skipped (normal; not non-finite)
    first_nonfinite_term: Optional[str] = None
    window: list = field(default_factory=list)  # per-iteration records since the last monitor judgment


@dataclass
class RunData:
    """What a run reads besides its training batches (the training loader is built by the loop)."""
    train_set: CocoDetection
    val_set: CocoDetection
    val_loader: DataLoader  # this rank's share of the val images, for evaluation
    probe_images: list[torch.Tensor]  # the monitor's fixed probe set, on the device ([3, H, W] each)
    probe_targets: list[dict[str, torch.Tensor]]
    val_loss_loader: Optional[DataLoader] = None  # the val loader, with masks when the model trains them (val_loss.py)


@dataclass
class TrainingParts:
    """The model and everything that updates it; the checkpoint saves and resume restores these."""
    model: TwoStageDetector
    ddp_model: torch.nn.Module  # the model, wrapped in DistributedDataParallel with more than one rank
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler
    autocast: Callable[[], ContextManager]  # a fresh autocast context per call (nullcontext without AMP)
    loss_weights: LossWeights  # model.*.*_loss.weight and weight_ramp, read once
    ema: Optional[WeightAverage] = None  # solver.ema: the averaged weights, evaluated and saved beside the raw ones


@dataclass
class Run:
    cfg: Config  # resolved
    info: DistInfo
    device: torch.device
    out: Path
    say: Callable[[str], None]
    progress: bool
    metrics: MetricsLog
    health: HealthMonitor
    state: TrainState
    data: RunData
    parts: TrainingParts
    writers: Writers = field(default_factory=Writers)  # logging.writers (rank 0; none: every call a no-op)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self, path: Path) -> None:
        """A collective: every rank calls it (their RNG states are gathered); rank 0 writes."""
        rng_states = all_gather_objects(ckpt_io.rng_state())
        parts, train_set = self.parts, self.data.train_set
        if self.info.is_main:
            ckpt_io.write_checkpoint({
                "model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
                "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
                "iteration": self.state.iteration, "train_state": self.state.__dict__.copy(),
                "health": self.health.state_dict(), "rng": rng_states, "config": config_to_dict(self.cfg),
                "class_names": train_set.class_names, "label_to_cat_id": train_set.label_to_cat_id,
                **({"ema": parts.ema.state_dict()} if parts.ema is not None else {}),
            }, path)
            self.writers.flush()  # what a resume from this checkpoint keeps is on the trackers' disk too

    def evaluate_weights(self, with_val_loss: bool = True) -> dict:
        data, parts = self.data, self.parts
        model, loader = sliced_eval(self.cfg, parts.model, data.val_loader)  # data.tiling: sliced (infer/sliced.py)
        result, _ = evaluate(model, data.val_set, loader, self.device, self.cfg.monitor.score_thresholds,
                             progress=self.progress and self.info.is_main, autocast=parts.autocast)
        if not with_val_loss:
            return result
        if data.val_loss_loader is None:
            loader = tiled_val_loader(self.cfg, data.val_loader)  # data.tiling: tiles, as training sees them
            data.val_loss_loader = val_loss_loader(loader, self.cfg.model.mask.enabled)
        weights = parts.loss_weights.at(self.state.iteration)
        return {**result, **validation_losses(parts.model, data.val_loss_loader, self.device, weights, parts.autocast)}

    def evaluate(self) -> dict:
        """The weights a user gets (the average with solver.ema on; the raw weights' figures
        are logged beside it as raw/AP ...)."""
        raw, ema = {}, self.parts.ema
        if ema is not None:
            raw_result = self.evaluate_weights(with_val_loss=False)  # only its AP is logged (raw/...)
            raw = {f"raw/{k}": raw_result[k] for k in ("AP", "AP50", "AP75", "segm_AP") if k in raw_result}
            ema.sync_from_main()
            with ema.applied_to(self.parts.model):
                result = self.evaluate_weights()
        else:
            result = self.evaluate_weights()
        self.metrics.write({"type": "eval", "iter": self.state.iteration,
                            **{k: v for k, v in result.items()
                               if k not in ("per_class_AP", "per_class_segm_AP", "threshold_counts")}, **raw,
                            **{f"AP/{k}": v for k, v in result["per_class_AP"].items()},
                            **{f"segm_AP/{k}": v for k, v in result.get("per_class_segm_AP", {}).items()},
                            **result["threshold_counts"].as_record()})
        val_terms = "  ".join(f"{short_name(k[len('val/'):])} {v:.3f}" for k, v in result.items()
                              if k.startswith("val/loss_"))
        self.say(f"[eval @ iter {self.state.iteration}]"
                 + (f" (EMA weights; the raw weights: AP {raw['raw/AP']:.3f} AP50 {raw['raw/AP50']:.3f})" if raw else "")
                 + f"\n  val loss {result['val/loss']:.3f} (weighted total; terms unweighted: {val_terms})"
                 + f"\n{format_metrics(result)}\n"
                 f"{format_threshold_table(result['threshold_counts'])}")
        return result

    def evaluate_and_keep_best(self) -> dict:
        result = self.evaluate()
        if result["AP"] > self.state.best_ap:
            self.state.best_ap = result["AP"]
            self.save_checkpoint(self.out / "model_best.pth")
        val_terms = {k[len("val/"):]: v for k, v in result.items() if k.startswith("val/loss_")}
        for alarm in self.health.at_evaluation(self.state.iteration, result["val/loss"], result["AP"],
                                               ap50=result.get("AP50"), val_terms=val_terms):
            self.report_alarm(alarm)
        return result

    def report_alarm(self, alarm: Alarm) -> None:
        self.metrics.write({"type": "alarm", "iter": self.state.iteration, **alarm.to_record()})
        if self.health.should_print_in_full(alarm):
            self.say(alarm.format())
        else:
            self.say(f"ALARM [{alarm.name}] again at iter {self.state.iteration} ({self.health.summary()[alarm.name]} "
                     f"times so far; details above and in metrics.jsonl)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_run(user_cfg: Config, resume: bool, log: Callable[[str], None], progress: bool) -> Run:
    info = init_distributed(device_kind(user_cfg.train.device))
    device = pick_device(user_cfg.train.device, info)
    say = log if info.is_main else (lambda _msg: None)
    if user_cfg.train.threads:
        torch.set_num_threads(user_cfg.train.threads)
    seed_everything(user_cfg.seed + info.rank)
    out = Path(user_cfg.output_dir)
    if not resume:
        refuse_earlier_results(out)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=info.is_main)
    if not resume:  # a run that never reached a checkpoint (killed, or stopped by its preflight) starts over
        metrics.discard_earlier_runs()
    cfg, train_set, val_set, findings = prepare_checked_data(user_cfg, say, info.world_size, metrics)
    if info.is_main:
        save_config(cfg, out / "config.yaml")
    val_loader = build_eval_loader(cfg, val_set, indices=list(range(info.rank, len(val_set), info.world_size)))
    health = build_health_monitor(cfg, info.world_size)
    parts = TrainingParts(**build_training_parts(cfg, info, device, say), loss_weights=build_loss_weights(cfg.model))
    probe_images, probe_targets = probe_batch(cfg, train_set, val_set, device)
    data = RunData(train_set=train_set, val_set=val_set, val_loader=val_loader, probe_images=probe_images,
                   probe_targets=probe_targets)
    run = Run(cfg=cfg, info=info, device=device, out=out, say=say, progress=progress, metrics=metrics, health=health,
              state=TrainState(), data=data, parts=parts)
    model = parts.model
    if cfg.model.roi.cls_loss.logit_adjust:
        counts = drawn_object_counts([r.labels for r in train_set.records], cfg.model.num_classes,
                                     cfg.data.repeat_factor_threshold)
        model.roi_heads.set_class_counts(counts)
        offsets = model.roi_heads.class_logit_offsets[1:]
        say(f"[loss] logit adjustment (model.roi.cls_loss.logit_adjust={cfg.model.roi.cls_loss.logit_adjust:g}): "
            f"training logits offset 0 to {offsets.min().item():.2f} by class frequency ({max(counts):.0f} to "
            f"{min(counts):.0f} objects drawn per epoch)")
    if resume:
        resume_from_latest(run)
    if run.state.iteration == 0 and cfg.model.init_from:  # a new run (or a resume that found no checkpoint)
        initialize_from(model, Path(cfg.model.init_from), say)
    if cfg.solver.ema.enabled and parts.ema is None:  # from the weights the run starts with
        parts.ema = WeightAverage(model, cfg.solver.ema.decay, cfg.solver.ema.warmup)
    if info.is_main:  # from here on every metrics.jsonl record also goes to logging.writers
        run.writers = build_writers(cfg, out, say, resume_step=run.state.iteration)
        metrics.listener = run.writers.record
    if run.state.iteration == 0:  # a resumed run has these lines from its first start
        log_findings(metrics, findings)
    if info.world_size > 1:
        parts.ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return run


def claim_run_folder(out: Path, resume: bool) -> None:
    """The run folder must be new, hold nothing this run writes, or be one a run of ours made
    (run_folder.py). A --resume of a folder an earlier version made (checkpoints, no marker) claims it."""
    legacy = resume and not owned_by_us(out) and ckpt_io.periodic_checkpoints(out / "checkpoints")
    claim_folder(out, "rcnn-train", TRAIN_OUTPUTS, overwrite=bool(legacy),
                 hint="choose a new or empty --output-dir (or output_dir in the config)")


def refuse_earlier_results(out: Path) -> None:
    """A new run never replaces the checkpoints or final weights of an earlier run in its folder."""
    earlier = [p.name for p in ckpt_io.periodic_checkpoints(out / "checkpoints")[:1]]
    earlier += [name for name in ("model_final.pth", "model_best.pth") if (out / name).exists()]
    if earlier:
        raise UserError(f"output dir '{out}' already holds results of an earlier run ({', '.join(earlier)}). Pass "
                        f"--resume to continue it, or --output-dir NEW_DIR (or delete '{out}') to start over.")


def log_findings(metrics: MetricsLog, findings: list) -> None:
    for finding in findings:
        metrics.write({"type": "preflight", "iter": 0, "severity": finding.severity, **finding.alarm.to_record()})


def prepare_checked_data(user_cfg: Config, say: Callable[[str], None], world_size: int,
                         metrics: MetricsLog) -> tuple[Config, CocoDetection, CocoDetection, list]:
    """The resolved config, both splits and the preflight findings (errors are logged and stop here)."""
    cfg, train_set, val_set = prepare_datasets(user_cfg, say, world_size)
    for name, dataset in (("train", train_set), ("val", val_set)):
        say(format_summary(summarize_dataset(dataset, name), dataset))
    report = preflight_from_config(cfg, train_set, "train")
    say(report.format())
    if report.errors:
        log_findings(metrics, report.findings)
        raise_on_errors(report)
    if norm_note(cfg.model.backbone.name, cfg.model.backbone.norm):  # LayerNorm backbones: `norm` does not apply
        say(norm_note(cfg.model.backbone.name, cfg.model.backbone.norm))
    elif cfg.model.backbone.weights is None and cfg.model.init_from is None and cfg.model.backbone.norm == "frozen_bn":
        say("WARNING model.backbone.weights is null and model.backbone.norm is frozen_bn: frozen BatchNorm "
            "at random init is an identity. From scratch, set model.backbone.norm to bn or gn.")
    return cfg, train_set, val_set, report.findings


def build_training_parts(cfg: Config, info: DistInfo, device: torch.device, say: Callable[[str], None]) -> dict:
    """TrainingParts' fields but the loss weights (and the EMA, made once the weights are loaded), as a dict."""
    model = build_model(cfg.model).to(device)
    if cfg.model.backbone.norm == "syncbn" and info.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    amp, dtype = cfg.solver.amp, cfg.solver.amp_dtype
    scaler = grad_scaler_for(device, amp, dtype)
    if amp:
        say(amp_summary(device, amp, dtype, scaler.is_enabled()))
    if use_channels_last(device, cfg.train.channels_last, amp_dtype(device, amp, dtype)):
        model.use_channels_last()
    if cfg.train.compile:
        model.backbone.compile()  # in place, so state dict names (checkpoints) stay as they are
        say("[compile] torch.compile of the backbone + FPN: the first iterations include compiling it")
    optimizer = build_optimizer(model, cfg.solver, grad_scaler=scaler.is_enabled())
    return dict(model=model, ddp_model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg.solver),
                scaler=scaler, autocast=autocast_for(device, amp, dtype))


def probe_batch(cfg: Config, train_set: CocoDetection, val_set: CocoDetection,
                device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The training images the monitor runs inference on: the same ones every judgment (the
    validation transforms: no flips), images with objects first, since the threshold counts
    compare detections with ground truth."""
    probe_set = copy.copy(train_set)
    probe_set.transforms = val_set.transforms
    with_objects = [i for i, r in enumerate(probe_set.records) if len(r.labels)]
    others = [i for i, r in enumerate(probe_set.records) if not len(r.labels)]
    if cfg.data.tiling is not None:  # the model sees tiles: so does the probe
        from rcnn_trainer.data.tiled_dataset import tiles_with_objects

        probe_set = tiles_with_objects(cfg, probe_set, cfg.monitor.probe_images)
        with_objects, others = list(range(len(probe_set))), []
    items = [probe_set[i] for i in (with_objects + others)[:cfg.monitor.probe_images]]
    return [image.to(device) for image, _ in items], [t for _, t in items]


def resume_from_latest(run: Run) -> None:
    found = ckpt_io.load_latest(run.ckpt_dir, log=run.say)
    if found is None:
        run.say(f"[resume] no loadable checkpoint in '{run.ckpt_dir}': starting from iteration 0.")
        run.metrics.discard_earlier_runs()
        return
    ckpt, path = found
    for line in compare_resume_config(ckpt["config"], config_to_dict(run.cfg)):
        run.say(f"[resume] config differs from the checkpoint: {line}")
    parts = run.parts
    parts.model.load_state_dict(ckpt["model"])
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    parts.scheduler.load_state_dict(ckpt["scheduler"])
    parts.scaler.load_state_dict(ckpt["scaler"])
    run.state = TrainState(**ckpt["train_state"])
    run.health.load_state_dict(ckpt["health"])
    if run.cfg.solver.ema.enabled:
        parts.ema = WeightAverage(parts.model, run.cfg.solver.ema.decay, run.cfg.solver.ema.warmup)
        if "ema" in ckpt:
            parts.ema.load_state_dict(ckpt["ema"])
        else:
            run.say(f"[resume] solver.ema is on but '{path}' holds no average: it starts from these weights.")
    rng_states, rank = ckpt["rng"], run.info.rank
    ckpt_io.restore_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])
    run.metrics.truncate_after(run.state.iteration, final=run.state.iteration >= run.cfg.solver.max_iters)
    run.say(f"[resume] continuing from '{path}' at iteration {run.state.iteration}.")
