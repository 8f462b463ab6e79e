"""train.compile compiles the backbone in place: checkpoints keep their names."""

from __future__ import annotations

from conftest import tiny_config
from rcnn_trainer.model.build import build_model


def test_compiled_backbone_keeps_the_state_dict_names(tmp_path):
    model = build_model(tiny_config(tmp_path).model)
    names = list(model.state_dict())
    model.backbone.compile()  # what train.compile does (compilation itself happens at the first forward)
    assert list(model.state_dict()) == names
    assert tiny_config(tmp_path, train={"compile": True}).train.compile is True
