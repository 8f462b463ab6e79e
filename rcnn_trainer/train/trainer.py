"""The training loop, in one fixed order per iteration:

  data -> forward (autocast) -> weighted sum -> backward -> unscale -> clip (pre-clip norm
  logged) -> non-finite / overflow decision -> step -> lr step -> log -> monitor / eval / checkpoint

Building the run (datasets, auto settings, model, optimizer, resume, probe set) lives in
run_setup.py; the skip decision in step_decision.py. Checkpoints, metrics and console output
happen on rank 0 only.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from rcnn_trainer.config import Config
from rcnn_trainer.data.loader import build_train_loader
from rcnn_trainer.runtime import checkpoint as ckpt_io
from rcnn_trainer.runtime.device import to_device
from rcnn_trainer.runtime.distributed import broadcast_from_main, mean_over_ranks
from rcnn_trainer.train.metrics_log import scalars_to_floats
from rcnn_trainer.train.run_lock import RunLock
from rcnn_trainer.train.run_setup import Run, build_run, claim_run_folder
from rcnn_trainer.train.step_decision import StepDecision, StepOutcome, decide_step
from rcnn_trainer.errors import TrainingStopped
from rcnn_trainer.losses.weighting import LOSS_NAMES, short_name, weighted_total
from rcnn_trainer.model import stats as S
from rcnn_trainer.model.stats import require_stats
from rcnn_trainer.monitor.dashboard import format_dashboard
from rcnn_trainer.monitor.period import PeriodMeans
from rcnn_trainer.monitor.probe import probe
from rcnn_trainer.monitor.window import window_means
from rcnn_trainer.writers import run_pictures

GRAD_NORM = "_grad_norm"  # a key of the per-step host copy, logged as grad_norm


def train(cfg: Config, resume: bool = False, log: Callable[[str], None] = tqdm.write,
          progress: bool = True) -> dict:
    """Train as configured; returns the final evaluation metrics. The writing process (rank 0)
    holds the run folder's lock for the whole run: a second run into it stops with exit 2.
    `cfg` is not changed; the resolved config is the run folder's config.yaml."""
    is_writer = int(os.environ.get("RANK", "0")) == 0
    if is_writer:
        claim_run_folder(Path(cfg.output_dir), resume)
    with RunLock(Path(cfg.output_dir)) if is_writer else contextlib.nullcontext():
        started = time.time()
        run = build_run(cfg, resume, log, progress)
        try:
            train_loop(run)
            return finish(run, started)
        except BaseException as err:  # the trackers mark their run as ended too (a resume reopens it)
            run.writers.close("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise


def train_loop(run: Run) -> None:
    cfg, state = run.cfg, run.state
    max_iters = cfg.solver.max_iters
    loader = build_train_loader(cfg, run.data.train_set, start_iter=state.iteration, rank=run.info.rank,
                                world_size=run.info.world_size)
    if state.iteration == 0:
        for alarm in run.health.at_start():  # e.g. an SGD lr far above 0.02 per 16 images
            run.report_alarm(alarm)
    bar = tqdm(total=max_iters, initial=state.iteration, desc="train", dynamic_ncols=True,
               disable=not (run.progress and run.info.is_main))
    data_iter = iter(loader)
    first_iteration = state.iteration
    run.parts.model.train()
    while state.iteration < max_iters:
        t0 = time.perf_counter()
        batch = next_batch(data_iter, cfg, lambda: save_progress(run))
        images, targets = to_device(*batch, run.device)
        t_data = time.perf_counter() - t0
        record = train_step(run, images, targets, state.iteration == first_iteration)
        record.update(data_time=t_data, time=time.perf_counter() - t0)
        stop_on_nonfinite_streak(run)
        state.window.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
        if state.iteration % cfg.train.log_period == 0 or state.iteration == max_iters:
            log_step(run, record)
        if state.iteration == 1 and not record.get("nonfinite"):
            for alarm in run.health.first_step(record):
                run.report_alarm(alarm)
        if state.iteration % cfg.monitor.period_for(max_iters) == 0 or state.iteration == max_iters:
            judge(run)
        if cfg.train.eval_period and state.iteration % cfg.train.eval_period == 0 and state.iteration < max_iters:
            run.evaluate_and_keep_best()
        periodic = state.iteration % cfg.train.checkpoint_period == 0 or state.iteration == max_iters
        if periodic and state.nonfinite_in_row == 0:  # no checkpoint in the middle of a non-finite streak
            run.save_checkpoint(run.ckpt_dir / f"ckpt_{state.iteration:07d}.pth")
            if run.info.is_main:
                ckpt_io.prune(run.ckpt_dir, cfg.train.keep_checkpoints)
    bar.close()


def train_step(run: Run, images, targets, first: bool) -> dict:
    """One iteration from forward to lr step; returns its record (every number it logs)."""
    parts = run.parts
    it, optimizer, scaler = run.state.iteration, parts.optimizer, parts.scaler
    lr = optimizer.param_groups[0]["lr"]
    with parts.autocast():
        losses, stats = parts.ddp_model(images, targets)
    if first:
        # the monitor reads these keys: a missing one is a bug, caught here
        require_stats(stats, S.TRAIN_STATS + (S.MASK_STATS if "loss_roi_mask" in losses else ()))
    weights = parts.loss_weights.at(it)  # ramped where model.*.*_loss.weight_ramp says so
    total, weighted = weighted_total(losses, weights)  # the one place weights are applied
    scaler.scale(total).backward()
    scaler.unscale_(optimizer)
    max_norm = run.cfg.solver.clip_grad_norm
    params = [p for p in parts.model.parameters() if p.requires_grad]
    grad_norm_t = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    # The step's one host sync: the loss terms averaged over ranks (so every rank sees a
    # non-finite term of any rank and all skip together), the stats and the gradient norm
    # (the same on every rank: gradients are all-reduced).
    terms = list(weighted)
    synced = mean_over_ranks({**{n: losses[n].detach() for n in terms},
                              **{f"{n}_weighted": weighted[n].detach() for n in terms}})
    host = scalars_to_floats({**synced, **stats, GRAD_NORM: grad_norm_t})
    grad_norm = host.pop(GRAD_NORM)
    decision = decide_step({n: host[n] for n in terms}, grad_norm, scaler.is_enabled())
    apply_step(run, decision)
    finite = decision.outcome is not StepOutcome.NONFINITE
    record = {"iter": it + 1, "lr": lr, **{f"weight/{n}": w for n, w in weights.items()},
              **step_flags(decision, grad_norm, max_norm),
              "loss": sum(host[f"{n}_weighted"] for n in terms) if finite else float("nan"), **host}
    if decision.outcome is StepOutcome.AMP_OVERFLOW:
        run.metrics.write({"type": "amp_overflow", "iter": it + 1, "scale": scaler.get_scale()})
    return record


def step_flags(decision: StepDecision, grad_norm: float, max_norm: Optional[float]) -> dict:
    if decision.outcome is StepOutcome.AMP_OVERFLOW:
        return {"amp_overflow": True, "grad_norm": float("nan"), "clipped": False}
    if decision.outcome is StepOutcome.APPLY or decision.bad_terms == ("gradients",):
        return {"grad_norm": grad_norm, "clipped": bool(max_norm and grad_norm > max_norm),
                **({"nonfinite": True} if decision.outcome is StepOutcome.NONFINITE else {})}
    return {"nonfinite": True}


def apply_step(run: Run, decision: StepDecision) -> None:
    """Optimizer, GradScaler and lr scheduler after the decision; counts skipped steps."""
    state, parts, scaler = run.state, run.parts, run.parts.scaler
    if decision.calls_optimizer:
        scaler.step(parts.optimizer)  # skips the update itself on an fp16 overflow
        state.nonfinite_in_row = 0
    if decision.outcome is StepOutcome.APPLY and parts.ema is not None:
        parts.ema.update(parts.model)
    scaler.update()  # also after a skipped step: unscale_ ran, and a non-finite loss lowers the scale
    if decision.outcome is StepOutcome.AMP_OVERFLOW:
        state.amp_overflows += 1
    elif decision.outcome is StepOutcome.NONFINITE:
        state.nonfinite_total += 1
        state.nonfinite_in_row += 1
        if state.nonfinite_in_row == 1:
            state.first_nonfinite_term = decision.bad_terms[0]
        run.say(f"WARNING iteration {state.iteration + 1}: non-finite {', '.join(decision.bad_terms)}; step skipped "
                f"({state.nonfinite_in_row} in a row, {state.nonfinite_total} in total)")
        run.metrics.write({"type": "nonfinite", "iter": state.iteration + 1, "terms": list(decision.bad_terms)})
    parts.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        # the schedule follows iterations, skipped ones included; torch warns when the first
        # steps were skipped (fp16 overflow while the GradScaler finds its scale): expected here
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        parts.scheduler.step()
    state.iteration += 1


def stop_on_nonfinite_streak(run: Run) -> None:
    state, limit = run.state, run.cfg.solver.max_nonfinite_steps
    if state.nonfinite_in_row >= limit:
        raise TrainingStopped(
            f"training stopped at iteration {state.iteration}: {state.nonfinite_in_row} non-finite steps in a "
            f"row (limit solver.max_nonfinite_steps={limit}); the first term to go non-finite was "
            f"{state.first_nonfinite_term}. Lower solver.lr, set solver.clip_grad_norm (e.g. 10), or check that "
            f"term's weight. The last good checkpoint in '{run.ckpt_dir}' is intact.")


def log_step(run: Run, record: dict) -> None:
    run.metrics.write({"type": "train", **record})
    run.say(f"iter {record['iter']}/{run.cfg.solver.max_iters}  loss {record['loss']:.3f}  "
            + "  ".join(f"{short_name(n)} {record[n]:.3f}" for n in LOSS_NAMES if n in record)
            + f"  lr {record['lr']:.2e}  gnorm {record.get('grad_norm', float('nan')):.2f}"
            + f"  {record['time']:.2f}s/it (data {record['data_time']:.2f}s)")


def judge(run: Run) -> None:
    """One monitor judgment: window means, probe inference, every check, the dashboard."""
    cfg, state, scaler = run.cfg, run.state, run.parts.scaler
    max_iters, period = cfg.solver.max_iters, cfg.monitor.period_for(cfg.solver.max_iters)
    mean = window_means(state.window)
    seen = probe(run.parts.model, run.data.probe_images, run.data.probe_targets, cfg.monitor.score_thresholds)
    run.metrics.write({"type": "monitor", "iter": state.iteration, **seen.counts.as_record(),
                       **{f"probe/{k}": v for k, v in seen.classes.as_record().items()},
                       **{f"mean/{k}": v for k, v in mean.items() if k != "iter"}})
    alarms = run.health.period(state.iteration, max_iters, state.window, mean, seen,
                               scaler.get_scale() if scaler.is_enabled() else None)
    state.window = []
    improving = run.health.improving()
    if improving:
        run.metrics.write({"type": "improving", "iter": state.iteration, "notes": improving})
    shown = (alarms or improving or (state.iteration // period) % cfg.monitor.dashboard_every == 0
             or state.iteration == max_iters)
    if shown or run.writers.names:  # the trackers get every judgment's block
        dashboard = format_dashboard(state.iteration, max_iters, PeriodMeans.from_means(mean), seen,
                                     run.health.last_evaluation(), improving)
        run.writers.text("monitor/dashboard", dashboard, state.iteration)
        if shown:
            run.say(dashboard)
    for alarm in alarms:
        run.report_alarm(alarm)
    # rank 0 decides for everyone: ranks see different local batches and must stop together
    collapsed = broadcast_from_main(any(a.name == "collapse" for a in alarms))
    if cfg.monitor.collapse.action == "stop" and collapsed:
        run.save_checkpoint(run.ckpt_dir / f"ckpt_{state.iteration:07d}.pth")
        raise TrainingStopped(f"training stopped by the collapse alarm (monitor.collapse.action: stop) at "
                              f"iteration {state.iteration}; a checkpoint was saved in '{run.ckpt_dir}'.")


def finish(run: Run, started: float) -> dict:
    """Final evaluation, model_best / model_final, the summary line and record."""
    state, max_iters = run.state, run.cfg.solver.max_iters
    last_eval = run.evaluate_and_keep_best()
    run.save_checkpoint(run.out / "model_final.pth")
    wall = time.time() - started
    alarm_summary = ", ".join(f"{name} x{n}" for name, n in sorted(run.health.summary().items()))
    run.say(f"[done] {max_iters} iterations in {wall / 60:.1f} min; AP {last_eval['AP']:.3f} "
            f"AP50 {last_eval['AP50']:.3f}; {state.nonfinite_total} non-finite steps skipped"
            + (f", {state.amp_overflows} AMP overflow steps skipped by the GradScaler" if run.parts.scaler.is_enabled() else "")
            + f"; alarms: {alarm_summary or 'none'}. "
            f"Outputs in '{run.out}' (model_final.pth, model_best.pth, metrics.jsonl, config.yaml).")
    run.metrics.write({"type": "summary", "iter": max_iters, "wall_time_s": wall, "AP": last_eval["AP"],
                       "AP50": last_eval["AP50"], "nonfinite_steps": state.nonfinite_total,
                       "amp_overflow_steps": state.amp_overflows, "alarms": run.health.summary()})
    send_outputs(run)
    return last_eval


def send_outputs(run: Run) -> None:
    """The run's pictures and (MLflow) final weights to the writers, then end their runs: waits at
    most logging.close_timeout_s for a slow tracker."""
    for tag, path in run_pictures(run.out):
        run.writers.picture(tag, path, run.state.iteration)
    if run.cfg.logging.mlflow.log_checkpoints:
        for name in ("model_best.pth", "model_final.pth"):
            if (run.out / name).is_file():
                run.writers.artifact(run.out / name, "checkpoints")
    run.writers.close("FINISHED")


def save_progress(run: Run) -> None:
    if run.state.iteration:
        run.save_checkpoint(run.ckpt_dir / f"ckpt_{run.state.iteration:07d}.pth")


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
