"""The `monitor:` section of config.yaml (MonitorConfig, at the end) and the numbers each
monitor check compares against, one group per check (`monitor.<check>.*`).

Every default was measured: docs/monitor.md gives, per check, the runs that set it and the
margin between healthy runs and the pathology it names. Raise or lower one when an alarm is
wrong for your data; the alarm's text names the group.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rcnn_trainer.config_base import Strict


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)


class InitialLossLimits(Limits):
    tolerance: float = Field(3.0, gt=1.0, description="initial_loss_scale: a classification term at the first step "
                             "outside [expected / tolerance, expected x tolerance] (expected: its value at zero logits).")
    box_limit: float = Field(5.0, gt=0.0, description="initial_loss_scale: a box term above this at the first step.")


class WeightRatioLimits(Limits):
    limit: float = Field(10.0, gt=1.0, description="loss_weight_ratio: the largest loss weight at least this many "
                         "times the smallest non-zero one.")


class FlatLossLimits(Limits):
    flat: float = Field(0.05, gt=0.0, description="flat_loss: a term whose trend (and first-to-last change) over "
                        "monitor.flat_window judgments is below this fraction ...")
    falling: float = Field(0.2, gt=0.0, description="... while the other terms together fall by more than this "
                           "fraction over the same judgments.")
    learned: float = Field(0.5, gt=0.0, lt=1.0, description="flat_loss: not for a term already below this fraction "
                           "of its highest judgment (it learned and levelled off).")
    box_refines: float = Field(0.1, gt=0.0, lt=1.0, description="flat_loss: not for loss_roi_box while the refined "
                               "boxes beat their proposals by this IoU (the regressor learned; its plateau is convergence).")
    box_follows: float = Field(0.5, gt=0.0, le=1.0, description="flat_loss: nor while its predicted deltas correlate "
                               "with their targets by this much and the refined boxes beat their proposals at all "
                               "(a regressor that follows its targets is learning; the glyphs' plateaued at corr 0.58).")


class StuckIouLimits(Limits):
    min_iou: float = Field(0.05, gt=0.0, lt=1.0, description="stuck_iou_loss: mean IoU of the refined positive boxes "
                           "with their GT below this for monitor.sustain judgments, with an IoU-type box loss.")


class StarvationLimits(Limits):
    min_share: float = Field(0.5, gt=0.0, description="foreground_starvation: RPN or RoI positives per image below "
                             "this x the GT objects per image for monitor.sustain judgments.")


class ProposalIouLimits(Limits):
    min_periods: int = Field(6, ge=3, description="proposal_iou_flat: judged from this many judgments after warmup on.")
    min_gain: float = Field(0.0, ge=0.0, description="proposal_iou_flat: the last 3 judgments never above the first "
                            "value + this ...")
    low: float = Field(0.55, gt=0.0, lt=1.0, description="... and all below this mean IoU of positive proposals.")


class CascadeLimits(Limits):
    min_gain: float = Field(-0.008, description="cascade_stage_not_improving: a stage's boxes beat the previous "
                            "stage's by less than this IoU (the same positives; negative: worse by more than its size) "
                            "for monitor.sustain judgments ...")
    min_periods: int = Field(5, ge=1, description="... judged from this many judgments after warmup on (the later "
                             "stages start from near-zero deltas).")


class LowConfidenceLimits(Limits):
    min_ratio: float = Field(0.1, gt=0.0, description="low_confidence / class_confusion: probe detections at the "
                             "score threshold nearest 0.5 below this x GT per image for monitor.sustain judgments.")
    fg_mass_split: float = Field(0.5, gt=0.0, lt=1.0, description="Foreground probability on the GT boxes below "
                                 "this: background wins (low_confidence); above it: the classes are confused.")
    min_progress: float = Field(0.05, gt=0.0, description="A rise of foreground probability or true-class share by "
                                "this over the window is progress: no alarm.")
    min_growth: float = Field(1.2, gt=1.0, description="No low_confidence while RoI positives per image still grow "
                              "by this factor from one window to the next (the RPN is still learning).")
    found_mass: float = Field(0.25, gt=0.0, lt=1.0, description="class_confusion at once when the mean foreground "
                              "probability is at least this (not falling) ...")
    flat_spread: float = Field(0.045, gt=0.0, description="... and every GT box gets nearly the same class "
                               "distribution (mean spread below this).")
    confusion_wait: float = Field(0.35, ge=0.0, lt=1.0, description="class_confusion (foreground found, classes "
                                  "confused) only once the foreground has been found for this share of the run's "
                                  "judgments: the classes separate a while after it arrives.")


class RegressorCollapseLimits(Limits):
    max_std_ratio: float = Field(0.1, gt=0.0, description="regressor_collapse: std of predicted / target deltas on "
                                 "positive RoIs below this ...")
    min_corr: float = Field(0.1, description="... and their correlation below this, for monitor.sustain judgments ...")
    small: float = Field(0.05, gt=0.0, description="... with the std ratio below this at every one of them ...")
    shrink: float = Field(0.9, gt=0.0, lt=1.0, description="... or falling at each, to at most this x its first value.")
    widen: float = Field(1.5, gt=1.0, description="No alarm while the std ratio widens by this factor over the window ...")
    constant: float = Field(0.005, gt=0.0, description="... to at least this (a spread of 1e-8 that doubles is still none).")


class MaskLearningLimits(Limits):
    margin: float = Field(0.0, ge=0.0, lt=1.0, description="mask_not_learning: the predicted masks' IoU with their "
                          "targets on positive RoIs at most this above the best mask that ignores the RoI (the full "
                          "box or the batch's mean mask), for monitor.sustain judgments after warmup ...")
    min_fall: float = Field(0.03, ge=0.0, lt=1.0, description="... while loss_roi_mask falls by less than this "
                            "share over them (a head on its way can pass through blank masks, its loss falling) ...")
    box_like: float = Field(0.95, gt=0.0, le=1.0, description="... unless the full box already scores this: the "
                            "segmentations are the boxes themselves, there is nothing more to learn.")


class OverfittingLimits(Limits):
    sustain: int = Field(2, ge=1, description="overfitting: the val loss rose at this many evaluations in a row "
                         "(train.eval_period) ...")
    min_rise: float = Field(0.05, gt=0.0, description="... by this share of its lowest value in all, while the "
                            "training loss fell and val AP rose by at most ap_drop over them; or ...")
    ap_drop: float = Field(0.03, gt=0.0, lt=1.0, description="... val AP stayed this much (absolute) below its best "
                           "for `sustain` evaluations.")


class GeneralizationLimits(Limits):
    loss_ratio: float = Field(2.5, gt=1.0, description="generalization_gap (at every evaluation, the final one "
                              "included): the val loss at least this x the training loss of the latest judgment ...")
    min_loss_gap: float = Field(0.5, ge=0.0, description="... and at least this much above it (near the end of a "
                                "long run both are small, and their ratio grows on small numbers); or ...")
    probe_score: float = Field(0.5, gt=0.0, lt=1.0, description="... the probe's detections per image at the "
                               "score threshold nearest this ...")
    count_tolerance: float = Field(0.25, ge=0.0, description="... within this share of its ground truth per image "
                                   "(the training images look solved) ...")
    ap50_share: float = Field(0.4, gt=0.0, le=1.0, description="... while val AP50 is below this x the recall those "
                              "counts promise (min(detections, GT) / GT).")


class LearningRateLimits(Limits):
    negligible_share: float = Field(0.01, gt=0.0, lt=1.0, description="vanishing_lr: an lr below this x the base lr "
                                    "(or below negligible_lr) is negligible ...")
    negligible_lr: float = Field(1e-6, ge=0.0, description="... as is any lr below this.")
    never_learned: float = Field(0.9, gt=0.0, description="... and fires while the loss is above this x its first "
                                 "step's and no term has fallen below learned_term x its first judgment ...")
    learned_term: float = Field(0.5, gt=0.0, lt=1.0, description="(see never_learned)")
    early_progress: float = Field(0.5, gt=0.0, le=1.0, description="... or, before this fraction of the run, while "
                                  "the loss is above early_decay_loss x its first step's.")
    early_decay_loss: float = Field(0.5, gt=0.0, description="(see early_progress)")


class LrPerImageLimits(Limits):
    limit: float = Field(4.0, gt=1.0, description="lr_too_high_for_batch: an SGD lr per image above this x the "
                         "reference 0.02 per 16 images.")


class GradientLimits(Limits):
    spike: float = Field(10.0, gt=1.0, description="gradients: a pre-clip norm above this x the running median.")
    min_history: int = Field(10, ge=1, description="gradients: spikes judged once this many finite norms were seen.")
    max_clipped: float = Field(0.5, gt=0.0, le=1.0, description="gradients: more than this share of a period's "
                               "steps clipped.")


class LossScaleLimits(Limits):
    falls: int = Field(3, ge=1, description="amp_loss_scale: the GradScaler's scale lower at each of this many "
                       "judgments in a row.")


class PreflightLimits(Limits):
    imbalance: float = Field(50.0, gt=1.0, description="class_imbalance: the most frequent class has more than this "
                             "many times the objects of the rarest.")
    min_kept_share: float = Field(0.5, gt=0.0, le=1.0, description="images_dropped (error): fewer than this share of "
                                  "the file's images survived loading.")
    normalized_min_side: float = Field(32.0, gt=0.0, description="normalized_boxes (error): every coordinate in [0, 1] "
                                       "on images whose sides are all above this many pixels.")
    xyxy_share: float = Field(0.3, gt=0.0, le=1.0, description="xyxy_boxes (error): more than this share of boxes past "
                              "the image as [x, y, w, h] but inside it as [x1, y1, x2, y2].")
    outside_share: float = Field(0.01, ge=0.0, le=1.0, description="boxes_outside_image: more than this share of boxes "
                                 "past the image border.")
    anchor_min_boxes: int = Field(10, ge=1, description="anchor_coverage: a size bucket is judged from this many boxes.")
    anchor_poor_share: float = Field(0.25, gt=0.0, le=1.0, description="anchor_coverage: more than this share of a "
                                     "bucket's boxes with no anchor at IoU >= 0.5.")
    tiny_share: float = Field(0.05, gt=0.0, le=1.0, description="tiny_boxes: more than this share of boxes thinner "
                              "than the finest anchor stride after resize.")
    max_images: int = Field(500, ge=1, description="Images sampled for the anchor and size checks.")
    augmented_samples: int = Field(16, ge=0, description="Images run through the training transforms to check "
                                   "their boxes (augmentation_boxes).")


class DivergenceLimits(Limits):
    loss_factor: float = Field(10.0, gt=1.0, description="divergence: a judgment's mean loss above this x the larger "
                               "of the first step's loss and its expected value at initialization.")
    explode: float = Field(4.0, gt=1.0, description="divergence: ... or above this x the lowest judgment mean so far "
                           "while above the first step's loss (a run that learned, then blew up).")
    grad_factor: float = Field(50.0, gt=1.0, description="divergence: the judgment's median pre-clip grad norm above "
                               "this x the first steps' (measured before the lr could act).")
    reference_steps: int = Field(3, ge=1, description="divergence: the first this many finite grad norms set the "
                                 "reference (their largest).")
    memory: int = Field(5, ge=0, description="Judgments after a cause alarm (divergence, vanishing_lr, gradients) "
                        "during which the symptoms it explains (collapse, low_confidence, ...) are held back.")


class TrendLimits(Limits):
    window: int = Field(4, ge=2, description="Judgments whose trend decides 'improving, not yet there' for "
                        "low_confidence, class_confusion and flat_loss.")
    min_step: float = Field(0.005, ge=0.0, description="... the judged metric must improve by more than this at every "
                            "one of them (noise on a stuck metric goes both ways) ...")
    correct_target: float = Field(0.5, gt=0.0, le=1.0, description="... and its linear trend, continued over the "
                                  "judgments left in the run, reach health: for class_confusion the true class's share "
                                  "of the foreground mass reaching this; for low_confidence the foreground probability "
                                  "reaching monitor.low_confidence.fg_mass_split; for flat_loss the term falling to "
                                  "monitor.flat_loss.learned x its highest.")


class CollapseConfig(Strict):
    patience: int = Field(3, ge=1, description="Checks in a row below min_ratio before the alarm.")
    min_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Detections/GT per image below this = collapsed.")
    drop: float = Field(0.9, gt=0.0, lt=1.0, description="Also collapsed: this fraction below the peak for patience "
                        "checks in a row ...")
    settle_ratio: float = Field(2.0, gt=1.0, description="... the peak counted from the first check with at most "
                                "this x GT detections per image (falling from the near-uniform early scores is "
                                "learning, not collapse).")
    action: Literal["warn", "stop"] = Field("warn", description="warn, or stop training.")


class MonitorConfig(Strict):
    score_thresholds: list[float] = Field(
        default_factory=lambda: [0.05, 0.3, 0.5, 0.7], description="Score thresholds of the count table.")
    period: Union[Literal["auto"], int] = Field(
        "auto", description="Iterations between monitor judgments (probe inference + every check); auto = "
        "max_iters / 20, at least 10 and at most 500, so every run gets about 20 judgments and a failing run "
        "is named within its first third.")
    dashboard_every: int = Field(5, ge=1, description="Print the dashboard block every this many judgments "
                                 "(and at the last one, and whenever an alarm fires).")
    probe_images: int = Field(8, ge=1, description="Training images the dashboard runs inference on.")
    collapse: CollapseConfig = Field(default_factory=CollapseConfig)
    dominant_share: float = Field(0.7, gt=0.0, le=1.0, description="Alarm when one weighted term is above this share of the total ...")
    sustain: int = Field(3, ge=1, description="... for this many monitor periods in a row (also foreground starvation, stuck IoU loss).")
    flat_window: int = Field(5, ge=3, description="Monitor periods over which a loss term's trend is judged flat.")
    repeat_every: int = Field(5, ge=1, description="A repeated alarm is summarised in one line until this many checks have passed.")
    # what each check compares against (the groups above; measured reasons in docs/monitor.md)
    initial_loss: InitialLossLimits = Field(default_factory=InitialLossLimits)
    weight_ratio: WeightRatioLimits = Field(default_factory=WeightRatioLimits)
    flat_loss: FlatLossLimits = Field(default_factory=FlatLossLimits)
    stuck_iou: StuckIouLimits = Field(default_factory=StuckIouLimits)
    starvation: StarvationLimits = Field(default_factory=StarvationLimits)
    proposal_iou: ProposalIouLimits = Field(default_factory=ProposalIouLimits)
    low_confidence: LowConfidenceLimits = Field(default_factory=LowConfidenceLimits)
    cascade: CascadeLimits = Field(default_factory=CascadeLimits)
    regressor_collapse: RegressorCollapseLimits = Field(default_factory=RegressorCollapseLimits)
    mask_learning: MaskLearningLimits = Field(default_factory=MaskLearningLimits)
    overfitting: OverfittingLimits = Field(default_factory=OverfittingLimits)
    generalization: GeneralizationLimits = Field(default_factory=GeneralizationLimits)
    learning_rate: LearningRateLimits = Field(default_factory=LearningRateLimits)
    lr_per_image: LrPerImageLimits = Field(default_factory=LrPerImageLimits)
    gradients: GradientLimits = Field(default_factory=GradientLimits)
    loss_scale: LossScaleLimits = Field(default_factory=LossScaleLimits)
    preflight: PreflightLimits = Field(default_factory=PreflightLimits)
    divergence: DivergenceLimits = Field(default_factory=DivergenceLimits)
    trend: TrendLimits = Field(default_factory=TrendLimits)

    @field_validator("period")
    @classmethod
    def _positive_period(cls, value):
        if value != "auto" and value < 1:
            raise ValueError(f"monitor.period must be >= 1 or auto, got {value}")
        return value

    def period_for(self, max_iters: int) -> int:
        if self.period != "auto":
            return self.period
        return max(10, min(500, max_iters // 20))

    @field_validator("score_thresholds")
    @classmethod
    def _sorted_thresholds(cls, values: list[float]) -> list[float]:
        if not values:
            raise ValueError("monitor.score_thresholds needs at least one threshold")
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"monitor.score_thresholds must lie in [0, 1], got {values}")
        if sorted(values) != values:
            raise ValueError(f"monitor.score_thresholds must be sorted ascending, got {values}")
        return values

