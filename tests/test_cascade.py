"""Cascade R-CNN (model.roi.cascade): config checks, the stage losses and their weights, inference
that averages the stages' scores, the monitor's stage IoUs and check, init_from a one-stage file,
and one tiny cascade + masks run that trains, evaluates and exports."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_config, tiny_dict, write_yaml
from rcnn_trainer.cli import export_main, train_main
from rcnn_trainer.config_model import MAX_CASCADE_STAGES
from rcnn_trainer.errors import UserError
from rcnn_trainer.losses.weighting import LossWeights
from rcnn_trainer.model import stats as S
from rcnn_trainer.model.build import build_loss_weights, build_model
from rcnn_trainer.model.cascade import CascadeHeads
from rcnn_trainer.model.init_from import initialize_from
from rcnn_trainer.monitor.checks import WEIGHT_KEYS, check_cascade_stages, check_dominant_term
from rcnn_trainer.monitor.dashboard import format_dashboard
from rcnn_trainer.monitor.period import PeriodMeans

CASCADE = {"roi": {"cascade": {}}}
MASKS = {"mask": {"enabled": True, "num_convs": 1, "conv_channels": 8}}


def cascade_config(tmp_path, **model):
    return tiny_config(tmp_path, model={**CASCADE, **model})


@pytest.mark.parametrize("cascade, key", [
    ({"iou_thresholds": [0.5, 0.4, 0.7]}, "model.roi.cascade.iou_thresholds"),
    ({"stages": 2}, "model.roi.cascade.iou_thresholds has 3 entries but model.roi.cascade.stages is 2"),
    ({"stage_weights": [1.0, 0.5]}, "model.roi.cascade.stage_weights"),
    ({"box_coder_weights": [[10, 10, 5, 5], [20, 20, 10], [30, 30, 15, 15]]}, "model.roi.cascade.box_coder_weights"),
])
def test_a_wrong_cascade_setting_is_a_config_error_naming_the_key(tmp_path, cascade, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        tiny_config(tmp_path, model={"roi": {"cascade": cascade}})


def test_stage_weights_multiply_the_head_weights_in_the_one_place_weights_live(tmp_path):
    cfg = tiny_config(tmp_path, model={"roi": {"cascade": {}, "box_loss": {"weight": 2.0}}})
    weights = build_loss_weights(cfg.model).final()
    assert weights["loss_roi_cls"] == 1.0 and weights["loss_roi_box"] == 2.0  # stage 1 keeps its names
    assert weights["loss_roi_cls_s2"] == 0.5 and weights["loss_roi_box_s2"] == 1.0
    assert weights["loss_roi_cls_s3"] == 0.25 and weights["loss_roi_box_s3"] == 0.5
    assert WEIGHT_KEYS["loss_roi_box_s3"] == "model.roi.cascade.stage_weights"
    most = MAX_CASCADE_STAGES  # the table of loss terms names every stage the config allows
    LossWeights({f"loss_roi_{kind}_s{k}": build_loss_weights(cfg.model).terms["loss_roi_cls"]
                 for k in range(2, most + 1) for kind in ("cls", "box")})


def test_stage_losses_are_finite_and_every_stage_learns(tmp_path):
    model = build_model(cascade_config(tmp_path, **MASKS).model).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:30, 8:30] = masks[1, 30:60, 20:50] = 1
    targets = [{"boxes": torch.tensor([[8.0, 8, 30, 30], [20, 30, 50, 60]]), "labels": torch.tensor([1, 3]),
                "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}]  # an image without objects
    losses, stats = model(images, targets)
    expected = {"loss_rpn_cls", "loss_rpn_box", "loss_roi_cls", "loss_roi_box", "loss_roi_mask",
                "loss_roi_cls_s2", "loss_roi_box_s2", "loss_roi_cls_s3", "loss_roi_box_s3"}
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    # every stage's classifier starts at ln(C+1) (zero logits), each over its own avg_factor
    for name in ("loss_roi_cls", "loss_roi_cls_s2", "loss_roi_cls_s3"):
        assert abs(float(losses[name].detach()) - math.log(5)) < 0.05
    for k in (2, 3):
        assert all(key in stats for key in (*S.roi_stage_factors(k), S.roi_stage_pos(k), S.roi_stage_iou(k)))
    sum(losses.values()).backward()
    heads = model.roi_heads
    for stage in heads.later_stages:  # gradients reach each later stage's classifier and regressor
        assert stage.box_predictor.cls_score.weight.grad.abs().sum() > 0
        assert stage.box_predictor.bbox_pred.weight.grad.abs().sum() > 0


def test_inference_averages_the_stage_scores_and_takes_the_last_stage_boxes(tmp_path):
    cfg = cascade_config(tmp_path)
    cfg.model.roi.score_thresh, cfg.model.roi.nms_thresh = 0.0, 1.0  # keep every (box, class)
    model = build_model(cfg.model).eval()
    heads: CascadeHeads = model.roi_heads
    for stage in heads.later_stages:  # make the stages disagree
        torch.nn.init.normal_(stage.box_predictor.cls_score.weight, std=0.5)
        torch.nn.init.normal_(stage.box_predictor.bbox_pred.weight, std=0.05)
    features = model.backbone(model.preprocess([torch.rand(3, 64, 64)]).tensors)
    proposals = [torch.tensor([[4.0, 4, 30, 30], [20, 20, 60, 50], [10, 30, 40, 62]])]
    with torch.no_grad():
        detections, _, _ = heads(features, proposals, [(64, 64)])
        logits, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, proposals, [(64, 64)])))
        probs, boxes = logits.softmax(-1), heads.box_coder.decode_single(deltas, proposals[0])
        for stage in heads.later_stages:
            boxes = boxes.clamp(0, 64)
            logits, deltas = stage.box_predictor(stage.box_head(heads.box_roi_pool(features, [boxes], [(64, 64)])))
            probs, boxes = probs + logits.softmax(-1), stage.box_coder.decode_single(deltas, boxes)
    averaged = (probs / 3)[:, 1:].flatten()  # [proposal x 4 foreground classes]
    expected = averaged.sort(descending=True).values
    det = detections[0]
    assert len(det["scores"]) == expected.numel()
    assert torch.allclose(det["scores"], expected, atol=1e-5)
    # every class of a proposal carries the last stage's (class-agnostic) box
    top = int(det["scores"].argmax())
    assert torch.allclose(det["boxes"][top], boxes[int(averaged.argmax()) // 4].clamp(0, 64), atol=1e-4)


def stage_history(ious, judgments=6):
    base = {"loss": 1.0, "lr": 1e-3, **{f"{n}{w}": 0.25 for n in ("loss_rpn_cls", "loss_rpn_box", "loss_roi_cls",
                                                                   "loss_roi_box") for w in ("", "_weighted")},
            S.RPN_POS: 3.0, S.ROI_POS: 20.0, S.GT_PER_IMAGE: 3.0, S.ROI_PROPOSAL_IOU: 0.6, S.ROI_PRED_IOU: 0.7,
            S.RPN_PRED_IOU: 0.8, S.ROI_DELTA_STD_RATIO: 0.9, S.ROI_DELTA_CORR: 0.9,
            "loss_roi_cls_s2": 0.5, "loss_roi_cls_s2_weighted": 0.5}
    return [PeriodMeans.from_means({**base, **{S.roi_stage_iou(k): v for k, v in enumerate(ious, start=1)}})
            for _ in range(judgments)]


def test_the_monitor_sees_the_stages(capsys):
    healthy = stage_history([0.70, 0.76, 0.79])
    assert check_cascade_stages(healthy, sustain=3) is None
    line = next(l for l in format_dashboard(10, 20, healthy[-1], _probe()).splitlines() if "cascade" in l)
    assert line.strip() == "cascade IoU of positives: proposals 0.60 -> s1 0.70 -> s2 0.76 -> s3 0.79"
    assert check_cascade_stages(stage_history([0.70, 0.76, 0.7564]), sustain=3) is None  # a healthy lag
    stuck = stage_history([0.70, 0.76, 0.74])  # stage 3 moves stage 2's boxes away from their objects
    alarm = check_cascade_stages(stuck, sustain=3)
    assert alarm.name == "cascade_stage_not_improving" and alarm.subject == "s3"
    assert any("model.roi.cascade.box_coder_weights" in c for c in alarm.change)
    assert any("model.roi.cascade.iou_thresholds" in c for c in alarm.change)
    assert check_cascade_stages(stuck[:4], sustain=3) is None  # not before monitor.cascade.min_periods
    # the dominance check covers a stage term: weighted above every other term and 80% of the total
    dominant = [PeriodMeans.from_means({**_means(h), "loss": 5.0, "loss_roi_cls_s2": 1.0,
                                        "loss_roi_cls_s2_weighted": 4.0}) for h in stuck]
    alarm = check_dominant_term(dominant, max_share=0.7, sustain=3)
    assert alarm.name == "dominant_loss" and "model.roi.cascade.stage_weights" in alarm.change[0]


def _means(h: PeriodMeans) -> dict:
    means = {**h.terms, **{f"{n}_weighted": v for n, v in h.weighted.items()}, "loss": h.loss, "lr": h.lr,
             S.RPN_POS: h.rpn_pos, S.ROI_POS: h.roi_pos, S.GT_PER_IMAGE: h.gt_per_image,
             S.ROI_PROPOSAL_IOU: h.proposal_iou, S.ROI_PRED_IOU: h.roi_pred_iou, S.RPN_PRED_IOU: h.rpn_pred_iou,
             S.ROI_DELTA_STD_RATIO: h.delta_std_ratio, S.ROI_DELTA_CORR: h.delta_corr}
    return {**means, **{S.roi_stage_iou(k): v for k, v in enumerate(h.stage_ious, start=1)}}


def _probe():
    from rcnn_trainer.monitor.probe import ClassDiagnosis, ProbeResult
    from rcnn_trainer.monitor.threshold_counts import ThresholdCounts

    return ProbeResult(ThresholdCounts((0.05, 0.3, 0.5, 0.7), (5.0, 3.0, 3.0, 3.0), 3.0),
                       ClassDiagnosis(fg_mass=1.0, correct=0.9, accuracy=1.0, margin=0.9, spread=0.6))


def test_init_from_a_one_stage_checkpoint_starts_the_first_stage(tmp_path):
    one_stage = build_model(tiny_config(tmp_path).model)
    path = tmp_path / "one_stage.pth"
    torch.save({"model": one_stage.state_dict()}, path)
    cascade = build_model(cascade_config(tmp_path).model)
    said = []
    report = initialize_from(cascade, path, said.append)
    log = "\n".join(said)
    assert "initializes stage 1" in log and "stages 2-3 (roi_heads.later_stages) keep their init" in log
    heads, theirs = cascade.roi_heads, one_stage.roi_heads
    assert torch.equal(heads.box_head.fc6.weight, theirs.box_head.fc6.weight)
    assert torch.equal(heads.box_predictor.cls_score.weight, theirs.box_predictor.cls_score.weight)
    # the class-specific regressor [(C+1) * 4, D] averaged over the foreground classes: [4, D]
    expected = theirs.box_predictor.bbox_pred.weight.reshape(5, 4, -1)[1:].mean(0)
    assert torch.allclose(heads.box_predictor.bbox_pred.weight, expected)
    assert "roi_heads.box_predictor.bbox_pred.weight" in report.loaded
    assert all(k.startswith("roi_heads.later_stages.") for k in report.reinitialized)


def test_cascade_with_masks_trains_evaluates_and_exports(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", tiny_dict(tmp_path, model={**CASCADE, **MASKS},
                                                       solver={"max_iters": 6}))
    assert train_main(["--config", str(config), "--no-progress"]) == 0
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l.get("type") == "train"]
    for name in ("loss_roi_cls_s2", "loss_roi_box_s3", "loss_roi_mask"):  # logged weighted and unweighted
        assert all(math.isfinite(l[name]) and math.isfinite(l[f"{name}_weighted"]) for l in train)
    assert train[-1]["weight/loss_roi_cls_s3"] == 0.25 and "avg_factor/roi_box_s2" in train[-1]
    assert any(S.roi_stage_iou(3) in l for l in train)
    evaluations = [l for l in lines if "segm_AP" in l]
    assert evaluations and all(0.0 <= evaluations[-1][k] <= 1.0 for k in ("AP", "AP75", "segm_AP"))
    out = tmp_path / "model.pt"
    assert export_main(["--config", str(config), "--checkpoint", str(tmp_path / "run" / "model_final.pth"),
                        "--format", "torchscript", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "checked on one validation image" in printed and "does NOT match" not in printed
    boxes, scores, labels, masks = torch.jit.load(str(out))(torch.rand(1, 3, 64, 64))
    assert boxes.shape[1] == 4 and masks.shape[1:] == (1, 64, 64) and len(scores) == len(labels) == len(boxes)


def test_flat_loss_counts_a_refining_stage_box_term_as_learning():
    from rcnn_trainer.config_monitor import FlatLossLimits
    from rcnn_trainer.monitor.checks import output_shows_learning

    assert output_shows_learning("loss_roi_box_s3", stage_history([0.70, 0.76, 0.79])[-1], FlatLossLimits())
    assert not output_shows_learning("loss_roi_box_s3", stage_history([0.70, 0.76, 0.75])[-1], FlatLossLimits())


def test_a_later_stage_relabels_at_its_own_threshold_and_keeps_ignore_regions_out():
    from torchvision.models.detection import _utils as det_utils

    boxes = [torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 13], [30, 30, 40, 40], [50, 50, 60, 60]])]
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([2]),
              "ignore_boxes": torch.tensor([[50.0, 50, 60, 61]])}
    labels, matched, per_image = CascadeHeads._relabel(det_utils.Matcher(0.7, 0.7, False), boxes, [target])
    # IoU 1.0 and 0.77 at threshold 0.7: class 2; a far box: background; over the ignore box: -1
    assert labels.tolist() == [2, 2, 0, -1] and torch.equal(matched[1], target["boxes"][0])
    assert per_image[0].tolist() == [0, 0, 0, 0]
