"""The skip / fp16-overflow / non-finite decision of one optimizer step, branch by branch."""

import math

import pytest

from rcnn_trainer.train.resume import RESUME_FREE_KEYS, compare_resume_config, flatten
from rcnn_trainer.train.step_decision import StepOutcome, decide_step
from rcnn_trainer.errors import UserError

FINITE = {"loss_rpn_cls": 0.7, "loss_cls": 1.1}


@pytest.mark.parametrize("scaler", [False, True])
def test_finite_losses_and_gradients_apply(scaler):
    decision = decide_step(FINITE, grad_norm=3.0, scaler_enabled=scaler)
    assert decision.outcome is StepOutcome.APPLY and decision.calls_optimizer and decision.bad_terms == ()


@pytest.mark.parametrize("scaler", [False, True])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nonfinite_loss_term_skips_and_is_named(scaler, bad):
    decision = decide_step({**FINITE, "loss_box_reg": bad}, grad_norm=3.0, scaler_enabled=scaler)
    assert decision.outcome is StepOutcome.NONFINITE and not decision.calls_optimizer
    assert decision.bad_terms == ("loss_box_reg",)


def test_inf_gradients_under_a_grad_scaler_are_an_overflow_the_scaler_handles():
    decision = decide_step(FINITE, grad_norm=math.inf, scaler_enabled=True)
    assert decision.outcome is StepOutcome.AMP_OVERFLOW
    assert decision.calls_optimizer  # scaler.step skips the update and lowers the scale itself


def test_nonfinite_gradients_without_a_scaler_skip_the_step():
    decision = decide_step(FINITE, grad_norm=math.nan, scaler_enabled=False)
    assert decision.outcome is StepOutcome.NONFINITE and decision.bad_terms == ("gradients",)
    assert not decision.calls_optimizer


def test_a_nonfinite_loss_wins_over_an_overflow():
    decision = decide_step({"loss_cls": math.nan}, grad_norm=math.inf, scaler_enabled=True)
    assert decision.outcome is StepOutcome.NONFINITE and decision.bad_terms == ("loss_cls",)


def test_resume_free_keys_may_change_and_fixed_prefixes_may_not():
    saved = {"model": {"num_classes": 3}, "data": {"num_workers": 2, "root": "a"}, "solver": {"base_lr": 0.02}}
    for key in RESUME_FREE_KEYS:
        section, name = key.split(".")
        current = {**saved, section: {**saved[section], name: 7}}
        assert compare_resume_config(saved, current) == [f"{key}: 2 -> 7"]
    lr_changed = {**saved, "solver": {"base_lr": 0.01}}
    assert compare_resume_config(saved, lr_changed) == ["solver.base_lr: 0.02 -> 0.01"]
    with pytest.raises(UserError, match="data.root"):
        compare_resume_config(saved, {**saved, "data": {"num_workers": 2, "root": "b"}})
    with pytest.raises(UserError, match="model.num_classes"):
        compare_resume_config(saved, {**saved, "model": {"num_classes": 4}})


def test_flatten_joins_nested_keys_with_dots():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": None}) == {"a.b": 1, "a.c.d": [2], "e": None}


def test_resume_accepts_keys_added_to_the_schema_after_the_checkpoint():
    saved = {"data": {"batch_size": 2}, "model": {"num_classes": 3}}
    current = {"data": {"batch_size": 2, "max_annotation_mb": 4096.0}, "model": {"num_classes": 3}}
    assert compare_resume_config(saved, current) == ["data.max_annotation_mb: None -> 4096.0"]
    with pytest.raises(UserError, match="data.batch_size"):
        compare_resume_config(saved, {**current, "data": {"batch_size": 4, "max_annotation_mb": 4096.0}})
