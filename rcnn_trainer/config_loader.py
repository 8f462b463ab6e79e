"""Reading a config: YAML files, `_base_` inheritance, KEY=VALUE overrides, validation.

Every failure becomes a UserError whose message names the file and the key, with a
suggestion for a misspelt key. The resolved config is written back with `save_config`.
"""

from __future__ import annotations

import copy
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from rcnn_trainer.config import Config
from rcnn_trainer.errors import UserError
from rcnn_trainer.input_limits import (MAX_BASE_DEPTH, MAX_BASE_FILES, MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH,
                                         MAX_CONFIG_NODES, brief, check_file_size, check_nesting)
from rcnn_trainer.atomic_io import atomic_write_text


def load_config(path: str | Path, overrides: Iterable[str] = (), log: Callable[[str], None] | None = None) -> Config:
    """Read `path` (with its `_base_` chain), apply dotted overrides, validate. `log` gets one
    line per data source replaced (a user's data.train/val over a base's data.synthetic)."""
    notes: list[str] = []
    raw = _read_with_bases(Path(path), chain=(), notes=notes, cache={})
    for override in overrides:
        _apply_override(raw, override, notes)
    check_nesting(raw, str(path), MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, what="config (with its _base_ files and overrides)")
    for note in notes:
        (log or (lambda _: None))(note)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict, source: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise UserError(_explain_validation_error(err, source)) from None


def save_config(cfg: Config, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_to_dict(cfg: Config) -> dict:
    return cfg.model_dump(mode="json")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"model": {"rpn": {"nms_thresh": 0.7}}} -> {"model.rpn.nms_thresh": 0.7}: configs compared key by key."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------- YAML + _base_
def _is_file(path: Path) -> bool:
    """Path.is_file, but False for a name no file can have (over NAME_MAX, a NUL), not an error."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _read_yaml(path: Path) -> dict:
    if not _is_file(path):
        raise UserError(f"config file '{path}' does not exist.")
    check_file_size(path, MAX_CONFIG_BYTES, "config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:  # unreadable: no permission, or a file such as /proc/self/mem
        raise UserError(f"config file '{path}' cannot be read: {err.strerror or err}.") from None
    except RecursionError:
        raise UserError(f"config file '{path}': nested too deeply to read (more than a few hundred levels); "
                        f"no valid config does.") from None
    except UnicodeDecodeError as err:
        raise UserError(f"config file '{path}' is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context_mark", None)
        opened = (f" ({err.context} at line {context.line + 1}, column {context.column + 1})"
                  if context is not None and getattr(err, "context", None) else "")
        raise UserError(f"{where}: YAML syntax error: {problem}{opened}. Check indentation, brackets and "
                        f"'key: value' spacing there.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (data:, model:, ...), "
                        f"found a {type(data).__name__}.")
    check_nesting(data, str(path), MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, what="config")
    return data


def _read_with_bases(path: Path, chain: tuple[Path, ...], notes: list[str], cache: dict) -> dict:
    """The file merged onto its bases. `cache` holds each file's result by resolved path, so a
    base included along many paths (a diamond) is read and merged once; callers get a copy
    (merging pops data sources in place)."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise UserError(f"_base_ cycle: {cycle}. Remove one of the _base_ links.")
    if len(chain) >= MAX_BASE_DEPTH:
        raise UserError(f"{path}: _base_ chain deeper than {MAX_BASE_DEPTH} files "
                        f"({' -> '.join(p.name for p in chain[:4])} -> ...). Merge some of them.")
    if resolved not in cache:
        if len(cache) >= MAX_BASE_FILES:
            raise UserError(f"{path}: more than {MAX_BASE_FILES} files in the _base_ includes of one config.")
        cache[resolved] = _merged_with_bases(path, resolved, chain, notes, cache)
    return copy.deepcopy(cache[resolved])


def _merged_with_bases(path: Path, resolved: Path, chain: tuple[Path, ...], notes: list[str], cache: dict) -> dict:
    data = _read_yaml(path)
    base = data.pop("_base_", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    merged: dict = {}
    for entry in bases:
        base_path = (path.parent / str(entry))
        if not _is_file(base_path):
            raise UserError(f"{path}: _base_ file '{entry}' does not exist (looked for "
                            f"{os.path.normpath(os.path.abspath(base_path))}; _base_ is relative to the config file).")
        merged = deep_merge(merged, _read_with_bases(base_path, chain + (resolved,), notes, cache))
    if isinstance(data.get("data"), dict) and isinstance(merged.get("data"), dict):
        _replace_data_source(merged["data"], data["data"].keys(), f"{path}", notes)
    return deep_merge(merged, data)


# One data source at a time: setting one replaces the other that a base (or the file) set.
DATA_SOURCES = {"train": "synthetic", "val": "synthetic", "synthetic": ("train", "val")}


def _replace_data_source(data: dict, new_keys: Iterable[str], where: str, notes: list[str]) -> None:
    for key in new_keys:
        if key not in DATA_SOURCES:
            continue
        other = DATA_SOURCES[key]
        for old in (other,) if isinstance(other, str) else other:
            if data.get(old) is not None:
                data.pop(old)
                notes.append(f"[config] {where} sets data.{key}: it replaces data.{old} of the base config.")


def deep_merge(base: dict, update: dict) -> dict:
    """Mappings merge key by key; any other value (lists too) in `update` replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- overrides
def _apply_override(raw: dict, override: str, notes: list[str]) -> None:
    if "=" not in override:
        raise UserError(f"override '{override}' is not KEY=VALUE (e.g. solver.max_iters=200).")
    dotted, text = override.split("=", 1)
    keys = dotted.strip().split(".")
    _check_key_path(keys, override)
    if len(text) > MAX_CONFIG_BYTES:
        raise UserError(f"override '{dotted}': the value is {len(text):,} characters, over {MAX_CONFIG_BYTES:,}.")
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"override '{dotted}': the value is nested too deeply to read.") from None
    except yaml.YAMLError:
        value = text
    check_nesting(value, f"override '{dotted}'", MAX_CONFIG_DEPTH, MAX_CONFIG_NODES)
    if len(keys) >= 2 and keys[0] == "data" and isinstance(raw.get("data"), dict) and value is not None:
        _replace_data_source(raw["data"], [keys[1]], f"override '{dotted}'", notes)
    node = raw
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation such as Optional[CocoSplit], else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        model = _model_of(arg)
        if model is not None:
            return model
    return None


def _check_key_path(keys: list[str], override: str) -> None:
    for depth, key in enumerate(keys):
        model = _model_at(tuple(keys[:depth]))  # the keys before this one are valid sections or a value
        if model is None:
            raise UserError(f"override '{override}': '{'.'.join(keys[:depth])}' is a value, not a section; "
                            f"it has no key '{key}'.")
        if key not in model.model_fields:
            section = ".".join(keys[:depth]) or "the top level"
            raise UserError(f"override '{override}': no key '{key}' in {section}.{_suggest(key, model.model_fields)}")


def _suggest(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(candidates))}."


# --------------------------------------------------------------------------- messages
def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema section at a key path, or None if the path leads to a value or nowhere."""
    model: type[BaseModel] | None = Config
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        model = _model_of(model.model_fields[part].annotation)
    return model


def _explain_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} problem(s)):"]
    for item in err.errors():
        loc = tuple(p for p in item["loc"] if isinstance(p, (str, int)))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            hint = _suggest(str(loc[-1]), parent.model_fields) if parent else ""
            lines.append(f"  - {key}: unknown key.{hint}")
        elif item["type"] == "missing":
            lines.append(f"  - {key}: required key is missing.")
        else:
            message = item["msg"].removeprefix("Value error, ")
            got = item.get("input")
            shown = "" if isinstance(got, dict) else f" (got {brief(got)})"
            lines.append(f"  - {key}: {message}{shown}")
    return "\n".join(lines)
