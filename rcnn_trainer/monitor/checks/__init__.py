"""Training-health checks, one file per family, named after the alarms they raise:

- loss_scale.py: initial_loss_scale, loss_weight_ratio, dominant_loss
- loss_trends.py: flat_loss, stuck_iou_loss
- sampling.py: foreground_starvation, proposal_iou_flat
- classification.py: low_confidence, class_confusion
- regression.py: regressor_collapse, mask_not_learning
- learning_rate.py: vanishing_lr, lr_too_high_for_batch
- divergence.py: divergence
- gradients.py: gradients, amp_loss_scale
- collapse.py: collapse
- overfitting.py: overfitting (at evaluations)
- generalization.py: generalization_gap (at every evaluation, the final one included)
- cascade.py: cascade_stage_not_improving (with model.roi.cascade)

Each check takes plain numbers (the per-judgment means of the training log, `history`: one
PeriodMeans per judgment, oldest first, or the probe set's ProbeResults) and returns an Alarm
or None. health.py decides when each runs.
"""

from rcnn_trainer.monitor.checks.classification import (CapacityAdvice, check_low_confidence, class_confusion,
                                                        positives_growing)
from rcnn_trainer.monitor.checks.cascade import check_cascade_stages
from rcnn_trainer.monitor.checks.collapse import check_collapse
from rcnn_trainer.monitor.checks.divergence import check_divergence
from rcnn_trainer.monitor.checks.generalization import check_generalization_gap, generalization_levers
from rcnn_trainer.monitor.checks.gradients import check_gradients, check_loss_scale
from rcnn_trainer.monitor.checks.keys import BOX_TYPE_KEYS, WEIGHT_KEYS
from rcnn_trainer.monitor.checks.learning_rate import check_learning_rate, check_lr_per_image
from rcnn_trainer.monitor.checks.loss_scale import (check_dominant_term, check_initial_loss_scale, check_weight_ratio,
                                                    expected_initial_losses)
from rcnn_trainer.monitor.checks.loss_trends import (check_flat_term, check_stuck_iou_loss, output_shows_learning,
                                                     relative_slope)
from rcnn_trainer.monitor.checks.overfitting import check_overfitting
from rcnn_trainer.monitor.checks.regression import check_mask_not_learning, check_regressor_collapse
from rcnn_trainer.monitor.checks.sampling import check_foreground_starvation, check_proposal_iou_not_rising

__all__ = ["BOX_TYPE_KEYS", "WEIGHT_KEYS", "CapacityAdvice", "check_cascade_stages", "check_collapse", "check_divergence", "check_dominant_term",
           "check_flat_term", "check_foreground_starvation", "check_generalization_gap", "check_gradients", "check_initial_loss_scale",
           "check_learning_rate", "check_loss_scale", "check_low_confidence", "check_lr_per_image",
           "check_mask_not_learning", "check_overfitting", "check_proposal_iou_not_rising", "check_regressor_collapse",
           "check_stuck_iou_loss", "check_weight_ratio", "class_confusion", "expected_initial_losses",
           "generalization_levers", "output_shows_learning", "positives_growing", "relative_slope"]
