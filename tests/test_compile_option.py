"""train.compile compiles the backbone in place: checkpoints keep their names, and the backbone's
forward then runs through torch.compile (TorchDynamo), with the eager module's outputs.

Inductor itself takes ~45 s on this CPU with a cold cache, so the test swaps in TorchDynamo's
counting backend (which runs the captured graph eagerly) for the backend `compile()` asks for:
what is checked is that train.compile routes the backbone through torch.compile, not inductor."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from conftest import tiny_config
from rcnn_trainer.runtime.distributed import DistInfo
from rcnn_trainer.train.run_setup import build_training_parts


@pytest.fixture
def counting_compile(monkeypatch):
    """torch.compile as train.compile calls it, but with a backend that counts captured graphs."""
    counter, real_compile, calls = CompileCounter(), torch.compile, []

    def compile_counting(fn, *args, **kwargs):
        calls.append(fn)
        return real_compile(fn, *args, **{**kwargs, "backend": counter})
    monkeypatch.setattr(torch, "compile", compile_counting)
    torch._dynamo.reset()
    yield counter, calls
    torch._dynamo.reset()


def parts(tmp_path, compile_: bool):
    said = []
    built = build_training_parts(tiny_config(tmp_path, train={"compile": compile_}), DistInfo(),
                                 torch.device("cpu"), said.append)
    return built["model"], said


def test_compile_option_compiles_the_backbone_in_place(tmp_path, counting_compile):
    counter, calls = counting_compile
    eager, said_eager = parts(tmp_path, False)
    assert not calls and eager.backbone._compiled_call_impl is None
    assert not any("[compile]" in line for line in said_eager)

    torch.manual_seed(0)
    model, said = parts(tmp_path, True)
    assert len(calls) == 1 and model.backbone._compiled_call_impl is not None  # the backbone, and only it
    assert all(m._compiled_call_impl is None for name, m in model.named_modules() if name != "backbone")
    assert any("[compile]" in line for line in said)
    assert list(model.state_dict()) == list(eager.state_dict())  # checkpoints keep their names

    eager.load_state_dict(model.state_dict())
    model.eval(), eager.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = eager.backbone(x), model.backbone(x)
    assert counter.frame_count >= 1 and counter.op_count > 20  # the forward ran as a captured graph
    assert list(got) == list(expected)
    for level in expected:
        torch.testing.assert_close(got[level], expected[level], rtol=1e-4, atol=1e-5)
