"""The training loop, in one fixed order per iteration:

  data -> forward (autocast) -> weighted sum -> non-finite check -> backward -> unscale
  -> clip (pre-clip norm logged) -> step -> lr step -> log -> monitor / eval / checkpoint

Extension points are plain callables passed to `train` (e.g. `after_forward` lets a test
inject a NaN). Checkpoints, metrics and console output happen on rank 0 only.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import io
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from rcnn_trainer.config import Config
from rcnn_trainer.config_loader import config_to_dict, save_config
from rcnn_trainer.data.loader import build_eval_loader, build_train_loader
from rcnn_trainer.data.summary import format_summary, summarize_dataset
from rcnn_trainer.engine import checkpoint as ckpt_io
from rcnn_trainer.engine.data_settings import prepare_datasets
from rcnn_trainer.engine.device import (amp_dtype, amp_summary, autocast_for, device_kind, grad_scaler_for,
                                        pick_device, to_device, use_channels_last)
from rcnn_trainer.engine.distributed import (all_gather_objects, broadcast_from_main, init_distributed,
                                             mean_over_ranks)
from rcnn_trainer.engine.evaluate import evaluate, format_metrics
from rcnn_trainer.monitor.threshold_counts import format_threshold_table
from rcnn_trainer.engine.metrics_log import MetricsLog, scalars_to_floats
from rcnn_trainer.engine.run_lock import RunLock
from rcnn_trainer.engine.optim import build_optimizer, build_scheduler
from rcnn_trainer.errors import TrainingStopped, UserError
from rcnn_trainer.losses.weighting import LOSS_NAMES, loss_weights, weighted_total
from rcnn_trainer.model.build import build_model
from rcnn_trainer.model.stats import require_stats
from rcnn_trainer.monitor.alarms import Alarm
from rcnn_trainer.monitor.dashboard import format_dashboard, probe
from rcnn_trainer.monitor.health import build_health_monitor
from rcnn_trainer.monitor.preflight import preflight_from_config, raise_on_errors

GRAD_NORM = "_grad_norm"  # a key of the per-step host copy, logged as grad_norm

# Config keys a resume must not change (they change what the weights mean or what data they see).
RESUME_FIXED_PREFIXES = ("model.", "data.")
RESUME_FREE_KEYS = {"data.num_workers"}


@dataclass
class TrainState:
    iteration: int = 0
    best_ap: float = -1.0
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    amp_overflows: int = 0  # fp16 steps the GradScaler skipped (normal; not non-finite)
    first_nonfinite_term: Optional[str] = None
    window: list = field(default_factory=list)  # per-iteration records since the last monitor block


def window_means(records: list[dict]) -> dict:
    """Mean of every number over the records, ignoring NaN (e.g. IoU with no positives)."""
    out = {}
    for key in records[-1]:
        values = [r[key] for r in records if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        out[key] = sum(values) / len(values) if values else float("nan")
    return out


def next_batch(data_iter, cfg: Config, save_progress: Callable[[], None]):
    """The next training batch, under the data watchdog (train.data_timeout_s): DataLoader
    workers time out inside the loader; in the main process faulthandler prints every thread's
    stack (where it waits) and exits. A dead worker or a timeout saves progress, then stops."""
    timeout = cfg.train.data_timeout_s
    in_process = bool(timeout and cfg.data.num_workers == 0)
    if in_process:
        try:  # needs a real file descriptor; a captured stderr (tests, notebooks) has none
            faulthandler.dump_traceback_later(timeout, exit=True, file=sys.__stderr__)
        except (io.UnsupportedOperation, ValueError, AttributeError):
            in_process = False
    try:
        return next(data_iter)
    except RuntimeError as err:
        text = str(err)
        if "timed out" not in text and "exited unexpectedly" not in text:
            raise
        save_progress()
        reason = (f"no training batch arrived within train.data_timeout_s={timeout} s" if "timed out" in text
                  else "a DataLoader worker process died")
        raise TrainingStopped(f"{reason} ({text.splitlines()[0][:200]}). The data loader is where it waited: check "
                              f"data.train (slow or network storage, very large images), lower data.num_workers, or "
                              f"raise train.data_timeout_s. Progress so far is saved; continue with --resume.") from None
    finally:
        if in_process:
            faulthandler.cancel_dump_traceback_later()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def compare_resume_config(saved: dict, current: dict) -> list[str]:
    """Refuse changes that matter; return the other differences to log."""
    old, new = flatten(saved), flatten(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    fatal = [k for k in changed if k.startswith(RESUME_FIXED_PREFIXES) and k not in RESUME_FREE_KEYS]
    if fatal:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fatal[:6])
        raise UserError(f"--resume refused: the config changed in a way that matters ({shown}). Resume with the "
                        f"original values, or start a new run with a different --output-dir.")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]


def train(cfg: Config, resume: bool = False, log: Callable[[str], None] = tqdm.write,
          after_forward: Optional[Callable[[int, dict], None]] = None, progress: bool = True) -> dict:
    """Train as configured; returns the final evaluation metrics. The writing process (rank 0)
    holds the run folder's lock for the whole run: a second run into it stops with exit 2."""
    is_writer = int(os.environ.get("RANK", "0")) == 0
    with RunLock(Path(cfg.output_dir)) if is_writer else contextlib.nullcontext():
        return _train(cfg, resume, log, after_forward, progress)


def _train(cfg: Config, resume: bool, log: Callable[[str], None],
           after_forward: Optional[Callable[[int, dict], None]], progress: bool) -> dict:
    started = time.time()
    info = init_distributed(device_kind(cfg.train.device))
    device = pick_device(cfg.train.device, info)
    say = log if info.is_main else (lambda _msg: None)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed + info.rank)
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    metrics = MetricsLog(out / "metrics.jsonl", enabled=info.is_main)
    if not resume and ckpt_io.periodic_checkpoints(ckpt_dir):
        raise UserError(f"output dir '{out}' already holds checkpoints from an earlier run. Pass --resume to "
                        f"continue it, or --output-dir NEW_DIR (or delete '{out}') to start over.")

    train_set, val_set = prepare_datasets(cfg, say)
    for name, dataset in (("train", train_set), ("val", val_set)):
        say(format_summary(summarize_dataset(dataset, name), dataset))
    report = preflight_from_config(cfg, train_set, "train")
    say(report.format())
    for finding in report.findings:
        metrics.write({"type": "preflight", "iter": 0, "severity": finding.severity, **finding.alarm.to_record()})
    raise_on_errors(report)
    if cfg.solver.max_epochs is not None:
        per_epoch = max(1, len(train_set) // (cfg.data.batch_size * info.world_size))
        iterations = cfg.solver.max_epochs * per_epoch
        if cfg.solver.steps and cfg.solver.steps[-1] >= iterations:
            raise UserError(f"solver.max_epochs={cfg.solver.max_epochs} gives {iterations} iterations "
                            f"({per_epoch} per epoch) but solver.steps {cfg.solver.steps} go beyond; give steps "
                            f"below {iterations}.")
        cfg.solver.max_iters = iterations
        say(f"solver.max_epochs={cfg.solver.max_epochs}: {per_epoch} iterations per epoch, max_iters={iterations}")
    if info.is_main:
        save_config(cfg, out / "config.yaml")
    if cfg.model.backbone.weights is None and cfg.model.backbone.norm == "frozen_bn":
        say("WARNING model.backbone.weights is null and model.backbone.norm is frozen_bn: frozen BatchNorm "
            "at random init is an identity. From scratch, set model.backbone.norm to bn or gn.")

    model = build_model(cfg.model).to(device)
    if cfg.model.backbone.norm == "syncbn" and info.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    amp = cfg.solver.amp
    scaler = grad_scaler_for(device, amp, cfg.solver.amp_dtype)
    autocast = autocast_for(device, amp, cfg.solver.amp_dtype)
    if amp:
        say(amp_summary(device, amp, cfg.solver.amp_dtype, scaler.is_enabled()))
    if use_channels_last(device, cfg.train.channels_last, amp_dtype(device, amp, cfg.solver.amp_dtype)):
        model.use_channels_last()
    optimizer = build_optimizer(model, cfg.solver, grad_scaler=scaler.is_enabled())
    scheduler = build_scheduler(optimizer, cfg.solver)
    state = TrainState()
    health = build_health_monitor(cfg, info.world_size)

    if resume:
        found = ckpt_io.load_latest(ckpt_dir, log=say)
        if found is None:
            say(f"[resume] no loadable checkpoint in '{ckpt_dir}': starting from iteration 0.")
            metrics.discard_earlier_runs()
        else:
            ckpt, path = found
            for line in compare_resume_config(ckpt["config"], config_to_dict(cfg)):
                say(f"[resume] config differs from the checkpoint: {line}")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            state = TrainState(**ckpt["train_state"])
            health.load_state_dict(ckpt["health"])
            rng_states = ckpt["rng"]
            ckpt_io.restore_rng_state(rng_states[info.rank] if info.rank < len(rng_states) else rng_states[0])
            metrics.truncate_after(state.iteration)
            say(f"[resume] continuing from '{path}' at iteration {state.iteration}.")

    ddp_model = model
    if info.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.solver.clip_grad_norm

    probe_set = copy.copy(train_set)
    probe_set.transforms = val_set.transforms  # no flips: the same images every check
    # images with objects first: the threshold counts compare detections with ground truth
    with_objects = [i for i, r in enumerate(probe_set.records) if len(r.labels)]
    others = [i for i, r in enumerate(probe_set.records) if not len(r.labels)]
    probe_items = [probe_set[i] for i in (with_objects + others)[:cfg.monitor.probe_images]]
    probe_images = [img.to(device) for img, _ in probe_items]
    probe_targets = [t for _, t in probe_items]
    monitor_period = cfg.monitor.period_for(cfg.solver.max_iters)
    val_loader = build_eval_loader(cfg, val_set, indices=list(range(info.rank, len(val_set), info.world_size)))

    def save_checkpoint(path: Path) -> None:
        rng_states = all_gather_objects(ckpt_io.rng_state())  # collective: every rank calls this
        if info.is_main:
            ckpt_io.atomic_save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "iteration": state.iteration, "train_state": state.__dict__.copy(),
                "health": health.state_dict(),
                "rng": rng_states, "config": config_to_dict(cfg),
                "class_names": train_set.class_names, "label_to_cat_id": train_set.label_to_cat_id,
            }, path)

    def run_eval() -> dict:
        result, _ = evaluate(model, val_set, val_loader, device, cfg.monitor.score_thresholds,
                             progress=progress and info.is_main, autocast=autocast)
        metrics.write({"type": "eval", "iter": state.iteration, **{k: v for k, v in result.items()
                       if k not in ("per_class_AP", "threshold_counts")},
                       **{f"AP/{k}": v for k, v in result["per_class_AP"].items()},
                       **result["threshold_counts"]})
        say(f"[eval @ iter {state.iteration}]\n{format_metrics(result)}\n"
            f"{format_threshold_table(result['threshold_counts'])}")
        return result

    def report_alarm(alarm: Alarm) -> None:
        metrics.write({"type": "alarm", "iter": state.iteration, **alarm.to_record()})
        if health.should_print_in_full(alarm):
            say(alarm.format())
        else:
            say(f"ALARM [{alarm.name}] again at iter {state.iteration} ({health.summary()[alarm.name]} times so far; "
                f"details above and in metrics.jsonl)")

    max_iters = cfg.solver.max_iters
    loader = build_train_loader(cfg, train_set, start_iter=state.iteration, rank=info.rank,
                                world_size=info.world_size)
    if state.iteration == 0:
        for alarm in health.at_start():  # e.g. an SGD lr far above 0.02 per 16 images
            report_alarm(alarm)
    bar = tqdm(total=max_iters, initial=state.iteration, desc="train", dynamic_ncols=True,
               disable=not (progress and info.is_main))
    data_iter = iter(loader)
    state_start = state.iteration
    last_eval: dict = {}
    model.train()
    while state.iteration < max_iters:
        it = state.iteration
        t0 = time.perf_counter()
        images, targets = to_device(*next_batch(data_iter, cfg, lambda: save_checkpoint(
            ckpt_dir / f"ckpt_{state.iteration:07d}.pth") if state.iteration else None), device)
        t_data = time.perf_counter() - t0
        lr = optimizer.param_groups[0]["lr"]

        with autocast():
            losses, stats = ddp_model(images, targets)
        if it == state_start:
            require_stats(stats)  # the monitor reads these keys: a missing one is a bug, caught here
        if after_forward is not None:
            after_forward(it, losses)
        weights = loss_weights(cfg.model, it)  # ramped where model.*.*_loss.weight_ramp says so
        total, _ = weighted_total(losses, weights)

        record = {"iter": it + 1, "lr": lr, "data_time": t_data, **{f"weight/{n}": w for n, w in weights.items()}}
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
        grad_norm_t = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        # The step's one host sync: the loss terms averaged over ranks (so every rank sees a
        # non-finite term of any rank and all skip together), the stats and the gradient norm
        # (the same on every rank: gradients are all-reduced).
        logged = scalars_to_floats({**mean_over_ranks({n: v.detach() for n, v in losses.items()}), **stats,
                                    GRAD_NORM: grad_norm_t})
        grad_norm = logged.pop(GRAD_NORM)
        bad = [n for n in LOSS_NAMES if n in losses and not math.isfinite(logged[n])]
        finite = not bad
        if finite and not math.isfinite(grad_norm) and scaler.is_enabled():
            # fp16 overflow: normal while the scaler finds its scale. scaler.step skips the update,
            # scaler.update lowers the scale; not a non-finite step.
            record.update(amp_overflow=True, grad_norm=float("nan"), clipped=False)
            state.amp_overflows += 1
            metrics.write({"type": "amp_overflow", "iter": it + 1, "scale": scaler.get_scale()})
        elif finite:
            finite = math.isfinite(grad_norm)
            bad = [] if finite else ["gradients"]
            record.update(grad_norm=grad_norm, clipped=bool(max_norm and grad_norm > max_norm))
        if finite:
            scaler.step(optimizer)  # skips the update itself on an fp16 overflow
            state.nonfinite_in_row = 0
        scaler.update()  # also after a skipped step: unscale_ ran, and a non-finite loss lowers the scale
        if not finite:
            state.nonfinite_total += 1
            state.nonfinite_in_row += 1
            if state.nonfinite_in_row == 1:
                state.first_nonfinite_term = bad[0]
            say(f"WARNING iteration {it + 1}: non-finite {', '.join(bad)}; step skipped "
                f"({state.nonfinite_in_row} in a row, {state.nonfinite_total} in total)")
            metrics.write({"type": "nonfinite", "iter": it + 1, "terms": bad})
            record["nonfinite"] = True
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # the schedule follows iterations, skipped ones included; torch warns when the first
            # steps were skipped (fp16 overflow while the GradScaler finds its scale): expected here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            scheduler.step()
        state.iteration = it + 1

        if state.nonfinite_in_row >= cfg.solver.max_nonfinite_steps:
            raise TrainingStopped(
                f"training stopped at iteration {state.iteration}: {state.nonfinite_in_row} non-finite steps in a "
                f"row (limit solver.max_nonfinite_steps={cfg.solver.max_nonfinite_steps}); the first term to go "
                f"non-finite was {state.first_nonfinite_term}. Lower solver.lr, set solver.clip_grad_norm (e.g. 10), "
                f"or check that term's weight. The last good checkpoint in '{ckpt_dir}' is intact.")

        terms = [n for n in LOSS_NAMES if n in losses]
        record.update({"loss": sum(logged[n] * weights[n] for n in terms) if finite else float("nan"),
                       **{n: logged[n] for n in terms}, **{f"{n}_weighted": logged[n] * weights[n] for n in terms},
                       **{k: logged[k] for k in stats}, "time": time.perf_counter() - t0})
        state.window.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
        if state.iteration % cfg.train.log_period == 0 or state.iteration == max_iters:
            metrics.write({"type": "train", **record})
            say(f"iter {state.iteration}/{max_iters}  loss {record['loss']:.3f}  "
                + "  ".join(f"{n[5:]} {record.get(n, 0.0):.3f}" for n in LOSS_NAMES)
                + f"  lr {lr:.2e}  gnorm {record.get('grad_norm', float('nan')):.2f}"
                + f"  {record['time']:.2f}s/it (data {t_data:.2f}s)")
        if state.iteration == 1 and finite:
            for alarm in health.first_step(record):
                report_alarm(alarm)
        if state.iteration % monitor_period == 0 or state.iteration == max_iters:
            mean = window_means(state.window)
            seen = probe(model, probe_images, probe_targets, cfg.monitor.score_thresholds)
            metrics.write({"type": "monitor", "iter": state.iteration, **seen["counts"],
                           **{f"probe/{k}": v for k, v in seen["classes"].items()},
                           **{f"mean/{k}": v for k, v in mean.items() if k != "iter"}})
            alarms = health.period(state.iteration, max_iters, state.window, mean, seen,
                                   scaler.get_scale() if scaler.is_enabled() else None)
            state.window = []
            judgments = state.iteration // monitor_period
            if alarms or judgments % cfg.monitor.dashboard_every == 0 or state.iteration == max_iters:
                say(format_dashboard(state.iteration, max_iters, mean, seen))
            for alarm in alarms:
                report_alarm(alarm)
            # rank 0 decides for everyone: ranks see different local batches and must stop together
            collapsed = broadcast_from_main(any(a.name == "collapse" for a in alarms))
            if cfg.monitor.collapse.action == "stop" and collapsed:
                save_checkpoint(ckpt_dir / f"ckpt_{state.iteration:07d}.pth")
                raise TrainingStopped(f"training stopped by the collapse alarm (monitor.collapse.action: stop) at "
                                      f"iteration {state.iteration}; a checkpoint was saved in '{ckpt_dir}'.")
        if cfg.train.eval_period and state.iteration % cfg.train.eval_period == 0 and state.iteration < max_iters:
            last_eval = run_eval()
            if last_eval["AP"] > state.best_ap:
                state.best_ap = last_eval["AP"]
                save_checkpoint(out / "model_best.pth")
        periodic = state.iteration % cfg.train.checkpoint_period == 0 or state.iteration == max_iters
        if periodic and state.nonfinite_in_row == 0:  # no checkpoint in the middle of a non-finite streak
            save_checkpoint(ckpt_dir / f"ckpt_{state.iteration:07d}.pth")
            if info.is_main:
                ckpt_io.prune(ckpt_dir, cfg.train.keep_checkpoints)
    bar.close()

    last_eval = run_eval()
    if last_eval["AP"] > state.best_ap:
        state.best_ap = last_eval["AP"]
        save_checkpoint(out / "model_best.pth")
    save_checkpoint(out / "model_final.pth")
    wall = time.time() - started
    alarm_summary = ", ".join(f"{name} x{n}" for name, n in sorted(health.summary().items()))
    say(f"[done] {max_iters} iterations in {wall / 60:.1f} min; AP {last_eval['AP']:.3f} AP50 {last_eval['AP50']:.3f}; "
        f"{state.nonfinite_total} non-finite steps skipped"
        + (f", {state.amp_overflows} AMP overflow steps skipped by the GradScaler" if scaler.is_enabled() else "")
        + f"; alarms: {alarm_summary or 'none'}. "
        f"Outputs in '{out}' (model_final.pth, model_best.pth, metrics.jsonl, config.yaml).")
    metrics.write({"type": "summary", "iter": max_iters, "wall_time_s": wall, "AP": last_eval["AP"],
                   "AP50": last_eval["AP50"], "nonfinite_steps": state.nonfinite_total,
                   "amp_overflow_steps": state.amp_overflows,
                   "alarms": health.summary()})
    return last_eval
