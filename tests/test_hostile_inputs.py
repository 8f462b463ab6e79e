"""Hostile inputs (issue 37), a derandomized subset of tools/hostile_inputs.py: deep, huge and
path-like values in annotation files and configs, YAML texts (alias bombs, deep nesting, tags,
`_base_` at odd paths), image folders for rcnn-predict written into output folders that hold the
user's files, a planted hub cache file, links planted in a run folder. Each case loads, predicts
or is a UserError, writes nothing outside its output folder and changes none of the user's files
(the try_* functions assert it)."""

from __future__ import annotations

import pytest
from fuzz_inputs import mutated, try_coco, try_config, valid_coco, valid_config
from hostile_configs import YamlCase, try_config_text, yaml_cases
from hostile_folders import (
    OUTPUTS,
    Entry,
    FolderCase,
    image_folders,
    init_fills_skipped,
    tiny_model,
    try_predict,
)
from hostile_scenarios import HUB_PLANTS, RUN_PLANTS, try_hub_cache, try_run_folder
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st


def subset(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))


def test_deep_huge_and_path_like_annotation_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile_coco")
    outcomes = []

    @subset(120)
    @given(mutated(valid_coco(folder), max_size=100_000), st.booleans())
    @example({**valid_coco(folder), "images": [{"id": "../../x", "file_name": "../outside/secret.png", "width": 40,
                                                "height": 30}]}, True)
    def case(data, drop):
        outcomes.append(try_coco(data, folder, drop=drop))

    case()
    assert {"loaded", "user_error"} <= set(outcomes)


def test_deep_huge_and_path_like_config_values(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile_config")
    outcomes = []

    @subset(80)
    @given(mutated(valid_config(folder), max_steps=3))
    @example({**valid_config(folder), "model": {"backbone": {"weights": "x" * 300}}})  # over NAME_MAX: an OSError
    def case(raw):
        outcomes.append(try_config(raw, folder))

    case()
    assert {"loaded", "user_error"} <= set(outcomes)


def test_config_texts_bombs_nesting_tags_and_odd_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_yaml")
    outcomes = []

    @subset(150)
    @given(yaml_cases())
    # the cases that found tracebacks: a _base_ name over NAME_MAX, /proc/self/mem, a NUL
    @example(YamlCase("_base_: {repo}\n_base_: " + "a" * 5000 + "\n"))
    @example(YamlCase("_base_: /proc/self/mem\n"))
    @example(YamlCase('_base_: "x\\0y.yaml"\n'))
    def case(drawn):
        outcomes.append(try_config_text(drawn, root / f"case{len(outcomes)}"))

    case()
    assert {"loaded", "user_error"} <= set(outcomes)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("hostile_model"))


def test_predict_on_hostile_image_folders(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_predict")
    outcomes = []

    @subset(50)
    @given(image_folders())
    def case(drawn):
        outcomes.append(try_predict(drawn, root / f"case{len(outcomes)}", model))

    with init_fills_skipped():
        case()
    assert {"ok", "user_error"} <= set(outcomes)


@pytest.mark.parametrize("output", sorted(set(OUTPUTS)))
@pytest.mark.parametrize("overwrite", [False, True])
def test_predict_into_each_kind_of_output_folder(model, tmp_path, output, overwrite):
    """One readable image, a bomb and a 0-byte file, drawn: every output folder kind once, so that
    a link where predictions are drawn (vis/) is met on every run, not by chance."""
    entries = [Entry("a.png", "rgb", 20, 16, 1), Entry("bomb.png", "bomb", 1, 1, 0), Entry("z.jpg", "empty", 1, 1, 0)]
    with init_fills_skipped():
        try_predict(FolderCase(entries, ["folder"], output, overwrite, 0.0, True), tmp_path / "case", model)


@pytest.mark.parametrize("plant", HUB_PLANTS)
def test_planted_hub_cache_file_is_refused_and_runs_nothing(tmp_path, plant):
    assert try_hub_cache(plant, tmp_path / "case") == "user_error"


@pytest.mark.parametrize("plant", RUN_PLANTS)
def test_links_and_odd_files_planted_in_a_run_folder_are_refused(tmp_path, plant):
    assert try_run_folder(plant, tmp_path / "case") == "user_error"
