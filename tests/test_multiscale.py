"""Multi-scale training: data.min_size as a list, one size per global batch, exact on resume."""

from __future__ import annotations

import pytest

from conftest import crashed_then_resumed, tiny_config
from rcnn_trainer.config_loader import validate_config
from rcnn_trainer.data.loader import TrainBatchSampler, build_dataset, build_train_loader
from rcnn_trainer.train.metrics_log import MetricsLog
from rcnn_trainer.train.trainer import train

quiet = lambda _msg: None


def test_one_size_per_global_batch_the_same_on_every_rank_and_after_resume():
    sizes = [32, 48, 64]

    def batches(rank=0, world=1, start=0, count=30):
        stream = iter(TrainBatchSampler([1.0] * 10, 2, seed=5, group_by_aspect=True, start_iter=start, rank=rank,
                                        world_size=world, min_sizes=sizes))
        return [next(stream) for _ in range(count)]

    drawn = [{item[3] for item in batch} for batch in batches()]
    assert all(len(s) == 1 for s in drawn)  # one size per batch
    assert {s.pop() for s in drawn} == set(sizes)  # and every size drawn over 30 batches
    two_ranks = [batches(rank=r, world=2) for r in (0, 1)]
    assert [b[0][3] for b in two_ranks[0]] == [b[0][3] for b in two_ranks[1]]
    assert batches(start=7, count=5) == batches(count=12)[7:]  # a resumed stream draws alike
    # a single size keeps the three-item draws of single-scale training
    assert len(next(iter(TrainBatchSampler([1.0] * 4, 2, seed=0, group_by_aspect=True, min_sizes=[64])))[0]) == 3


def test_loader_resizes_each_batch_to_its_size_and_eval_uses_the_largest(tmp_path):
    cfg = tiny_config(tmp_path, data={"min_size": [32, 48, 64], "max_size": 64})
    train_set = build_dataset(cfg, "train")
    shorts = set()
    for step, (images, _targets) in zip(range(12), build_train_loader(cfg, train_set)):
        sides = {min(img.shape[-2:]) for img in images}
        assert len(sides) == 1
        shorts |= sides
    assert shorts == {32, 48, 64}
    image, _ = build_dataset(cfg, "val")[0]
    assert min(image.shape[-2:]) == 64


def test_multiscale_training_runs_and_resumes_exactly(tmp_path, after_forward):
    settings = dict(data={"min_size": [48, 64], "max_size": 64}, solver={"max_iters": 6},
                    train={"checkpoint_period": 3})
    train(tiny_config(tmp_path / "a", **settings), log=quiet, progress=False)
    crashed_then_resumed(tmp_path / "b", after_forward, **settings)
    strip = lambda lines: [{k: v for k, v in l.items() if "time" not in k} for l in lines]
    assert strip(MetricsLog(tmp_path / "a" / "run" / "metrics.jsonl").read()) == \
        strip(MetricsLog(tmp_path / "b" / "run" / "metrics.jsonl").read())


def test_a_size_list_must_fit_max_size(tmp_path):
    from conftest import tiny_dict
    from rcnn_trainer.errors import UserError

    with pytest.raises((UserError, ValueError), match="max_size"):
        validate_config(tiny_dict(tmp_path, data={"min_size": [48, 96], "max_size": 64}), source="test")
