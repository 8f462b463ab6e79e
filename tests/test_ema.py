"""solver.ema: the average's arithmetic, exactness across --resume, and the weights eval uses."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conftest import crashed_then_resumed, tiny_config, tiny_dict, write_yaml
from rcnn_trainer.cli import eval_main
from rcnn_trainer.train.ema import WeightAverage
from rcnn_trainer.train.metrics_log import MetricsLog
from rcnn_trainer.train.trainer import train

quiet = lambda _msg: None
EMA = {"enabled": True, "decay": 0.9, "warmup": 2}


def test_average_follows_the_formula_and_copies_integer_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = WeightAverage(model, decay=0.9, warmup=2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 2))
    expected = d * start["0.weight"] + (1 - d) * model[0].weight
    assert torch.allclose(ema.weights["0.weight"], expected)
    assert int(ema.weights["1.num_batches_tracked"]) == 7
    with ema.applied_to(model):
        assert torch.equal(model[0].weight, ema.weights["0.weight"])
    assert torch.equal(model[0].weight, start["0.weight"] + 1.0)  # the raw weights are back


def test_ema_is_saved_and_exact_across_resume(tmp_path, after_forward):
    settings = dict(solver={"max_iters": 6, "ema": EMA}, train={"checkpoint_period": 3})
    train(tiny_config(tmp_path / "a", **settings), log=quiet, progress=False)
    crashed_then_resumed(tmp_path / "b", after_forward, **settings)

    a = torch.load(tmp_path / "a" / "run" / "model_final.pth", weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / "model_final.pth", weights_only=True)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 6
    differs_from_raw = 0
    for key, value in a["ema"]["weights"].items():
        assert torch.allclose(value.float(), b["ema"]["weights"][key].float(), atol=1e-6), key
        differs_from_raw += not torch.equal(value, a["model"][key])
    assert differs_from_raw > 0  # an average, not a copy of the raw weights
    evals = [l for l in MetricsLog(tmp_path / "a" / "run" / "metrics.jsonl").read() if l["type"] == "eval"]
    assert {"AP", "raw/AP", "raw/AP50"} <= evals[-1].keys()


def test_eval_uses_the_average_when_on_and_says_so(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", tiny_dict(tmp_path, solver={"max_iters": 3, "ema": EMA}))
    train(tiny_config(tmp_path, solver={"max_iters": 3, "ema": EMA}), log=quiet, progress=False)
    checkpoint = str(tmp_path / "run" / "model_final.pth")
    assert eval_main(["--config", str(config), "--checkpoint", checkpoint, "--no-progress"]) == 0
    with_ema = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert "the EMA of" in capsys.readouterr().out
    assert eval_main(["--config", str(config), "--checkpoint", checkpoint, "--no-progress",
                      "solver.ema.enabled=false"]) == 0
    assert "also holds their EMA" in capsys.readouterr().out
    final = [l for l in MetricsLog(tmp_path / "run" / "metrics.jsonl").read() if l["type"] == "eval"][-1]
    assert with_ema["AP"] == pytest.approx(final["AP"])  # rcnn-eval scores what training's final eval scored
