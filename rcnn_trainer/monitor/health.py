"""HealthMonitor: keeps the history the checks need and runs them at the right moments.

- `first_step(record)`: after the first iteration (loss scale at init, lr per image).
- `period(...)`: every `monitor.period` iterations (all the other checks but one).
- `at_evaluation(...)`: after each evaluation, the final one included (overfitting, generalization_gap:
  val loss and AP against the training loss and the probe).
Alarms are rate-limited: one already shown in the last `repeat_every` checks is summarised in
one line instead of reprinted; every occurrence still goes to metrics.jsonl. The state is a
plain dict saved in checkpoints, so a resumed run raises the same alarms.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from rcnn_trainer.config import Config, MonitorConfig
from rcnn_trainer.losses.settings import ClsLoss, head_losses
from rcnn_trainer.model.build import build_loss_weights
from rcnn_trainer.monitor import checks
from rcnn_trainer.monitor.alarms import Alarm
from rcnn_trainer.monitor.checks.divergence import check_divergence
from rcnn_trainer.monitor.trend import OnCourse, on_course
from rcnn_trainer.monitor.period import PeriodMeans
from rcnn_trainer.monitor.probe import ProbeResult
from rcnn_trainer.monitor.state import MonitorState

MAX_NORMS_KEPT = 500


@dataclass
class HealthSettings:
    num_classes: int
    rpn_cls: ClsLoss  # the heads' own settings (losses/settings.py)
    roi_cls: ClsLoss
    box_types: dict
    base_lr: float
    optimizer: str
    batch_size: int
    warmup_iters: int
    loss_weights: dict
    monitor: MonitorConfig  # every number the checks compare against
    advice: checks.CapacityAdvice  # the resolved values class_confusion may suggest changing
    flips: bool = False  # training images are mirrored (data.hflip_prob > 0)
    pretrained: bool = False  # model.init_from: trained heads start below their zero-logit losses
    clip_grad_norm: Optional[float] = None  # solver.clip_grad_norm (advice names it when off)
    # what generalization_gap advises, in the order that fits this run (checks/generalization.py)
    levers: list[str] = dataclasses.field(default_factory=checks.generalization_levers)


def build_health_monitor(cfg: Config, world_size: int = 1) -> "HealthMonitor":
    m, rpn, roi = cfg.monitor, cfg.model.rpn, cfg.model.roi
    return HealthMonitor(HealthSettings(
        num_classes=cfg.model.num_classes,
        rpn_cls=head_losses(rpn).cls, roi_cls=head_losses(roi).cls,
        box_types={"rpn": rpn.box_loss.type, "roi": roi.box_loss.type},
        base_lr=cfg.solver.lr, optimizer=cfg.solver.optimizer, batch_size=cfg.data.batch_size * world_size,
        warmup_iters=cfg.solver.warmup_iters, loss_weights=build_loss_weights(cfg.model).final(), monitor=m,
        advice=checks.CapacityAdvice(representation_size=roi.representation_size,
                                     fpn_channels=cfg.model.backbone.fpn_channels, min_size=cfg.data.test_min_size,
                                     max_iters=cfg.solver.max_iters),
        flips=cfg.data.hflip_prob > 0, pretrained=cfg.model.init_from is not None,
        clip_grad_norm=cfg.solver.clip_grad_norm,
        levers=checks.generalization_levers(
            pretrained=cfg.model.init_from is not None or cfg.model.backbone.weights is not None,
            augmenting=cfg.data.hflip_prob > 0 or cfg.data.augment.enabled,
            tiling=cfg.data.tiling is not None)))


# what a model that does not learn (or whose updates overshoot) shows anyway: held back while a
# cause that explains them fired within monitor.divergence.memory judgments (docs/monitor.md's table)
SYMPTOMS_OF_NO_LEARNING = {"class_confusion", "low_confidence", "collapse", "regressor_collapse", "mask_not_learning",
                           "flat_loss", "proposal_iou_flat", "foreground_starvation", "stuck_iou_loss"}
CAUSES = {"divergence", "vanishing_lr", "gradients"}


class HealthMonitor:
    def __init__(self, settings: HealthSettings):
        self.settings = settings
        self.state = MonitorState()

    def state_dict(self) -> dict:
        return self.state.as_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state = MonitorState.from_dict(state)

    def at_start(self) -> list[Alarm]:
        """Before the first step: what the config alone says."""
        s = self.settings
        found = checks.check_lr_per_image(s.base_lr, s.batch_size, s.optimizer, s.monitor.lr_per_image)
        return [found] if found is not None else []

    def first_step(self, record: dict) -> list[Alarm]:
        s = self.settings
        self.state.initial_loss = record.get("loss")
        expected = checks.expected_initial_losses(record, num_classes=s.num_classes, rpn_cls=s.rpn_cls,
                                                  roi_cls=s.roi_cls)
        # a lower bound of the weighted total at initialization (the box terms start near 0 or are not known)
        self.state.expected_initial = sum(s.loss_weights.get(name, 1.0) * value for name, value in expected.items())
        found = [checks.check_initial_loss_scale(record, expected, s.monitor.initial_loss, pretrained=s.pretrained),
                 checks.check_weight_ratio(s.loss_weights, s.monitor.weight_ratio)]
        return [a for a in found if a is not None]

    def period(self, iteration: int, max_iters: int, records: list[dict], mean: dict, probe: ProbeResult,
               loss_scale: float | None) -> list[Alarm]:
        """One judgment: `records` are the iterations since the last one, `mean` their means,
        `probe` the probe set's threshold counts and class diagnosis."""
        s, st, m = self.settings, self.state, self.settings.monitor
        st.checks += 1
        st.history.append(mean)
        if st.initial_loss is None:  # the first step was not finite
            st.initial_loss = mean.get("loss")
        norms = [r["grad_norm"] for r in records if "grad_norm" in r]
        st.first_norms = (st.first_norms + [n for n in norms if math.isfinite(n)])[:m.divergence.reference_steps]
        past = list(st.grad_norms)
        st.grad_norms = (past + norms)[-MAX_NORMS_KEPT:]
        if loss_scale is not None:
            st.scales.append(loss_scale)
        history = [PeriodMeans.from_means(h) for h in st.history]  # plain dicts in the checkpointed state
        now = history[-1]
        past_warmup = iteration > s.warmup_iters
        earlier = [h.loss for h in history[:-1] if math.isfinite(h.loss)]
        found = [
            check_divergence([r["loss"] for r in records if "loss" in r], norms, initial_loss=st.initial_loss,
                             expected_initial=st.expected_initial, lowest_mean=min(earlier) if earlier else None,
                             reference_norm=max(st.first_norms) if st.first_norms else None, lr=now.lr, base_lr=s.base_lr,
                             optimizer=s.optimizer, batch_size=s.batch_size, warmup_iters=s.warmup_iters,
                             clip_grad_norm=s.clip_grad_norm, limits=m.divergence),
            checks.check_dominant_term(history, max_share=m.dominant_share, sustain=m.sustain),
            checks.check_stuck_iou_loss(history, s.box_types, sustain=m.sustain, limits=m.stuck_iou),
            checks.check_foreground_starvation(history, sustain=m.sustain, limits=m.starvation),
            checks.check_learning_rate(now.lr, s.base_lr, now.loss, st.initial_loss or 0.0,
                                       progress=iteration / max(max_iters, 1), past_warmup=past_warmup,
                                       lowest_term_ratio=lowest_term_ratio(history), limits=m.learning_rate),
            checks.check_gradients(norms, past, now.clipped,
                                   sum(1 for r in records if r.get("nonfinite")), m.gradients),
            checks.check_loss_scale(st.scales, m.loss_scale),
        ]
        probes: list[ProbeResult] = []  # the probe's judgments after warmup, built once for the checks below
        remaining = (max_iters - iteration) * st.checks / max(iteration, 1)  # judgments left
        if past_warmup:
            if st.warmup_end is None:  # the index of the first judgment after warmup
                st.warmup_end = len(history) - 1
            after_warmup = history[st.warmup_end:]
            found += self._head_output_checks(after_warmup)
            found.append(checks.check_flat_term(after_warmup, window=m.flat_window, first=history[0],
                                                limits=m.flat_loss))
            # trends from the end of warmup: the first proposals' IoU is noise on a few matches
            found.append(checks.check_proposal_iou_not_rising(after_warmup, m.proposal_iou))
            st.probe.append(probe.as_state())
            probes = [ProbeResult.from_state(p) for p in st.probe]
            roi_positives = [h.roi_pos for h in history]
            found.append(checks.check_low_confidence(probes, sustain=m.sustain, roi_positives=roi_positives,
                                                     flips=s.flips, advice=s.advice, limits=m.low_confidence,
                                                     run_judgments=st.checks + remaining))
            found.append(checks.check_collapse([p.counts.at_lowest for p in probes], probe.counts.gt_per_image,
                                               min_ratio=m.collapse.min_ratio, patience=m.collapse.patience,
                                               drop=m.collapse.drop, settle_ratio=m.collapse.settle_ratio))
        found = [a for a in found if a is not None]
        found = self._hold_while_improving(found, history, probes, remaining)
        return self._causes_before_symptoms(found, iteration)

    def _head_output_checks(self, after_warmup: list[PeriodMeans]) -> list[Alarm | None]:
        """What the RoI heads make of their positives: the box regressor, the masks, the cascade's stages."""
        s, m = self.settings, self.settings.monitor
        return [checks.check_regressor_collapse(after_warmup, sustain=m.sustain, limits=m.regressor_collapse,
                                                box_weight=s.loss_weights.get("loss_roi_box")),
                checks.check_mask_not_learning(after_warmup, sustain=m.sustain, limits=m.mask_learning),
                checks.check_cascade_stages(after_warmup, sustain=m.sustain, limits=m.cascade)]

    def _hold_while_improving(self, found: list[Alarm], history: list[PeriodMeans], probes: list[ProbeResult],
                              remaining: float) -> list[Alarm]:
        """low_confidence, class_confusion and flat_loss wait while their metric is on course to
        health by the end of the run (monitor/trend.py); `improving()` says so on the dashboard."""
        m = self.settings.monitor
        t = m.trend
        held: list[OnCourse] = []
        kept = []
        for alarm in found:
            if alarm.name in ("low_confidence", "class_confusion"):
                metric, target = (("foreground probability", m.low_confidence.fg_mass_split)
                                  if alarm.name == "low_confidence" else ("true class share", t.correct_target))
                series = [p.classes.fg_mass if alarm.name == "low_confidence" else p.classes.correct
                          for p in probes[-t.window:]]
                rising = True
            elif alarm.name == "flat_loss" and alarm.subject is not None:
                metric, rising = alarm.subject, False
                series = [h.terms.get(alarm.subject, math.nan) for h in history[-t.window:]]
                target = m.flat_loss.learned * max(h.terms.get(alarm.subject, 0.0) for h in history)
            else:
                kept.append(alarm)
                continue
            projected = on_course(series, target, remaining, rising=rising, min_step=t.min_step) \
                if len(series) >= t.window else None
            if projected is None:
                kept.append(alarm)
            else:
                held.append(OnCourse(alarm.name, metric, series[0], series[-1], projected, target))
        self.state.improving = [h.describe() for h in held]
        return kept

    def improving(self) -> list[str]:
        """The symptoms the latest judgment held back because their metric is on course to health."""
        return list(self.state.improving)

    def _causes_before_symptoms(self, found: list[Alarm], iteration: int) -> list[Alarm]:
        """A model whose lr is negligible, or whose updates overshoot, shows every symptom of not
        learning. While a cause fired within the last `monitor.divergence.memory` judgments the
        symptoms are held back; after that, a symptom of a run where a cause fired says so and
        carries the cause's advice, not its own (a model destroyed by divergence that collapses
        later needs a lower lr, not positive weights)."""
        st = self.state
        for alarm in found:
            if alarm.name in CAUSES:
                st.cause_at[alarm.name] = st.checks
                st.cause_iter.setdefault(alarm.name, iteration)
                st.cause_advice[alarm.name] = list(alarm.change)
        if not st.cause_at:
            return found
        if any(st.checks - at <= self.settings.monitor.divergence.memory for at in st.cause_at.values()):
            return [a for a in found if a.name not in SYMPTOMS_OF_NO_LEARNING]
        cause = min(st.cause_iter, key=st.cause_iter.get)  # the first cause of the run explains the rest
        return [a if a.name not in SYMPTOMS_OF_NO_LEARNING else
                dataclasses.replace(a, seen=f"{a.seen} (after {cause} at iter {st.cause_iter[cause]})",
                                    why=f"this follows from {cause} at iter {st.cause_iter[cause]}: {a.why}",
                                    change=st.cause_advice[cause])
                for a in found]

    def at_evaluation(self, iteration: int, val_loss: float, ap: float, ap50: float | None = None,
                      val_terms: dict | None = None) -> list[Alarm]:
        """After each evaluation in training, the final one included: the val loss and AP against
        the training loss of the latest judgment (overfitting: their trend over evaluations;
        generalization_gap: this one, with the probe's latest counts). `val_terms`: the val
        loss terms, unweighted, by name (loss_rpn_cls, ...)."""
        history = self.state.history
        train_loss = history[-1].get("loss", math.nan) if history else math.nan
        self.state.evals.append({"iter": iteration, "val_loss": val_loss, "train_loss": train_loss, "AP": ap,
                                 "AP50": ap50})
        m = self.settings.monitor
        probe = ProbeResult.from_state(self.state.probe[-1]) if self.state.probe else None
        found = [checks.check_overfitting(self.state.evals, m.overfitting),
                 checks.check_generalization_gap(self.state.evals[-1], probe, self.settings.levers, m.generalization,
                                                 val_terms=val_terms, train_terms=history[-1] if history else None)]
        return [a for a in found if a is not None]

    def should_print_in_full(self, alarm: Alarm) -> bool:
        """Count the alarm; False when the same alarm was shown in the last repeat_every checks."""
        st = self.state
        st.counts[alarm.name] = st.counts.get(alarm.name, 0) + 1
        last = st.last_shown.get(alarm.name)
        if last is not None and st.checks - last < self.settings.monitor.repeat_every:
            return False
        st.last_shown[alarm.name] = st.checks
        return True

    def summary(self) -> dict:
        return dict(self.state.counts)

    def last_evaluation(self) -> dict | None:
        """The latest evaluation's {"iter", "val_loss", "train_loss", "AP"}, if any."""
        return self.state.evals[-1] if self.state.evals else None


def lowest_term_ratio(history: list[PeriodMeans]) -> float | None:
    """The smallest (period mean / first judgment's mean) over the unweighted loss terms: below
    ~0.5 some term has clearly learned, whatever the weighted total does. Against the first
    judgment, not the first step: one batch's box term is noisy enough to halve by chance
    (seen with lr 1e-8, where nothing learns)."""
    first, now = history[0].terms, history[-1].terms
    ratios = [now[n] / first[n] for n in now if first.get(n, 0.0) > 0 and math.isfinite(now[n])]
    return min(ratios) if ratios else None
