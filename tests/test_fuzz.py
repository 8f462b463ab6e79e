"""A derandomized subset of generated bad COCO files and configs (hypothesis): each loads or is
a UserError that names the file, never a traceback. tools/fuzz_inputs.py runs thousands. Wrong
values only: deep, huge and path-like ones are tests/test_hostile_inputs.py's."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from fuzz_inputs import VALUE_EDITS, mutated, try_coco, try_config, valid_coco, valid_config

SUBSET = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.function_scoped_fixture])


def test_mutated_coco_files_load_or_are_user_errors(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_coco")
    outcomes = []

    @SUBSET
    @given(mutated(valid_coco(folder), edits=VALUE_EDITS))
    def case(data):
        outcomes.append(try_coco(data, folder))

    case()
    assert {"loaded", "user_error"} <= set(outcomes)  # the edits reach both outcomes


def test_mutated_configs_load_or_are_user_errors(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_config")
    outcomes = []

    @SUBSET
    @given(mutated(valid_config(folder), max_steps=3, edits=VALUE_EDITS))
    def case(data):
        outcomes.append(try_config(data, folder))

    case()
    assert {"loaded", "user_error"} <= set(outcomes)
