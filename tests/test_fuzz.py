"""A fixed-seed subset of generated bad COCO files: each loads or is a UserError, never a traceback."""

from __future__ import annotations

import random

import pytest

from fuzz_inputs import mutate, try_coco, try_config, valid_coco, valid_config


@pytest.mark.parametrize("seed", range(400))
def test_mutated_coco_file_loads_or_is_a_user_error(tmp_path_factory, seed):
    folder = tmp_path_factory.getbasetemp() / "fuzz_images"
    rng = random.Random(seed)
    data = mutate(valid_coco(folder), rng, steps=1 + seed % 4)
    case = tmp_path_factory.mktemp("case")
    for f in folder.iterdir():
        (case / f.name).write_bytes(f.read_bytes())
    assert try_coco(data, case) in ("loaded", "user_error")


@pytest.mark.parametrize("seed", range(300))
def test_mutated_config_loads_or_is_a_user_error(tmp_path_factory, seed):
    folder = tmp_path_factory.mktemp("cfg")
    data = mutate(valid_config(folder), random.Random(seed), steps=1 + seed % 3)
    assert try_config(data, folder) in ("loaded", "user_error")
