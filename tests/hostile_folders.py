"""Folders of hostile images for rcnn-predict (issue 37): valid files beside 0-byte, truncated,
garbage, 200-megapixel, odd-mode and multi-frame ones, folders named x.png, links in and out,
FIFOs, path-like names; given as a folder, globs or files, written into output folders that are
new, hold the user's files, links or an earlier run. `try_predict` runs the real run_prediction
on one case with a tiny untrained model: it predicts or is a UserError, writes nothing outside its
output folder and changes none of the user's files. Shared by tests/test_hostile_inputs.py and
tools/hostile_inputs.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from fs_guard import changes, guarded, plant_user_files, snapshot
from hypothesis import strategies as st
from PIL import Image


def png_bytes(w: int, h: int, mode: str = "RGB", fmt: str = "PNG", seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 60000, (h, w), dtype=np.uint16))
    elif mode == "F":
        img = Image.fromarray(rng.random((h, w), dtype=np.float32))
    elif mode == "I":
        img = Image.fromarray(rng.integers(0, 2**20, (h, w), dtype=np.int32))
    else:
        bands = Image.getmodebands(mode)
        img = Image.new(mode, (w, h), 3 if mode == "P" else tuple(range(1, bands + 1)) if bands > 1 else 1)
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@cache
def blob(kind: str) -> bytes:
    """The costly or fixed files, made once: a 200-megapixel PNG of 24 KB, one over PIL's warning
    limit, an animated GIF, a multi-page TIFF, a PNG with a huge text chunk."""
    if kind == "bomb":
        return png_bytes(20000, 10000, mode="1")
    if kind == "warn":
        return png_bytes(11000, 10000, mode="1")
    if kind in ("animated", "pages"):
        frames = [Image.new("RGB", (12, 10), (40 * k, 80, 120)) for k in range(3)]
        buffer = io.BytesIO()
        frames[0].save(buffer, format="GIF" if kind == "animated" else "TIFF", save_all=True, append_images=frames[1:])
        return buffer.getvalue()
    if kind == "text_chunk":
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_text("comment", "x" * (2 << 20), zip=True)
        return png_bytes(8, 8, pnginfo=info)
    raise KeyError(kind)


MODES = [("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("1", "PNG"), ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF"),
         ("CMYK", "JPEG"), ("CMYK", "TIFF"), ("RGBA", "PNG"), ("RGB", "BMP"), ("RGB", "GIF"), ("RGB", "WEBP"),
         ("RGB", "PPM"), ("L", "TIFF"), ("YCbCr", "JPEG"), ("LAB", "TIFF"), ("I;16", "TIFF")]
KINDS = ["rgb", "rgb", "rgb", "mode", "extreme", "empty", "truncated", "garbage", "bomb", "warn", "wrong_suffix",
         "dir", "link_in", "link_out", "dangling", "loop", "fifo", "animated", "pages", "text_chunk", "sub"]
STEMS = ["a", "0", "-rf", " ", "..", "...", ".hidden", "ü", "\u202egnp", "x" * 200, "%2e%2e%2f", "~", "C:\\x",
         "$(id)", "a\nb", "a b", "con", "🙂", "[a]", "*", "run", "predictions", "vis", "summary"]
SUFFIXES = [".png", ".PNG", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".txt", "",
            ".json", ".jsonl"]
# weighted towards cases that get as far as reading the images
INPUTS = ["folder"] * 6 + ["folder_dotdot", "glob", "glob_recursive", "file", "file", "missing", "user_link"]
OUTPUTS = ["new"] * 8 + ["nested", "empty", "user_files", "user_files", "user_outputs", "user_links", "is_file",
                         "ours_earlier", "ours_links", "vis_link", "foreign_marker", "marker_link", "images_folder",
                         "inside_images"]
NAME_TEXT = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=12)


@dataclass
class Entry:
    name: str
    kind: str
    w: int
    h: int
    seed: int


@dataclass
class FolderCase:
    entries: list
    inputs: list
    output: str
    overwrite: bool
    score: float
    draw: bool

    def __repr__(self) -> str:
        shown = ", ".join(f"{e.kind}:{e.name[:24]!r}:{e.w}x{e.h}" for e in self.entries)
        return (f"FolderCase([{shown}], inputs={self.inputs}, output={self.output!r}, overwrite={self.overwrite}, "
                f"score={self.score}, draw={self.draw})")


@st.composite
def image_folders(draw) -> FolderCase:
    entries, names = [], set()
    for k in range(draw(st.integers(0, 7))):
        stem = draw(st.one_of(st.sampled_from(STEMS), NAME_TEXT))
        name = stem + draw(st.sampled_from(SUFFIXES))
        while len(name.encode()) > 250:
            name = name[:-1]
        if name in names or name in (".", "..", "") or name.startswith("user_"):
            name = f"{k}_{name}"
        names.add(name)
        kind = draw(st.sampled_from(KINDS))
        w, h = (draw(st.sampled_from([(1, 1), (1, 3000), (3000, 1), (2, 700), (700, 2)])) if kind == "extreme"
                else (draw(st.integers(1, 40)), draw(st.integers(1, 40))))
        entries.append(Entry(name, kind, w, h, draw(st.integers(0, 2**16))))
    inputs = draw(st.lists(st.sampled_from(INPUTS), min_size=1, max_size=3))
    return FolderCase(entries, inputs, draw(st.sampled_from(OUTPUTS)), draw(st.booleans()),
                      draw(st.sampled_from([0.0, 0.05, 0.5, 1.0])), draw(st.booleans()))


def _write_entry(folder: Path, entry: Entry, sandbox: Path) -> None:
    path = folder / entry.name
    suffix = os.path.splitext(entry.name)[1].lower()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF",
           ".webp": "WEBP", ".ppm": "PPM", ".pgm": "PPM"}.get(suffix, "PNG")
    kind = entry.kind
    if kind in ("rgb", "extreme"):
        path.write_bytes(png_bytes(entry.w, entry.h, "L" if suffix == ".pgm" else "RGB", fmt, entry.seed))
    elif kind == "mode":
        mode, mode_fmt = MODES[entry.seed % len(MODES)]
        save = {"transparency": 3} if mode == "P" and entry.seed % 2 else {}
        try:
            path.write_bytes(png_bytes(entry.w, entry.h, mode, mode_fmt, entry.seed, **save))
        except (OSError, ValueError, KeyError):  # a mode this PIL cannot write in that format
            path.write_bytes(png_bytes(entry.w, entry.h, mode, "TIFF", entry.seed))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        full = png_bytes(entry.w + 16, entry.h + 16, "RGB", fmt if fmt in ("JPEG", "PNG", "TIFF") else "PNG",
                         entry.seed)
        path.write_bytes(full[: 1 + entry.seed % (len(full) - 1)])
    elif kind == "garbage":
        rng = np.random.default_rng(entry.seed)
        head = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"II*\x00"][entry.seed % 5]
        path.write_bytes(head + rng.integers(0, 256, entry.seed % 300, dtype=np.uint8).tobytes())
    elif kind in ("bomb", "warn", "animated", "pages", "text_chunk"):
        path.write_bytes(blob(kind))
    elif kind == "wrong_suffix":
        path.write_bytes(png_bytes(entry.w, entry.h, "RGB", "JPEG" if fmt == "PNG" else "PNG", entry.seed))
    elif kind == "dir":
        path.mkdir()
        (path / "inner.png").write_bytes(png_bytes(4, 4))
    elif kind == "link_in":
        (folder / f"target_{entry.seed}.png").write_bytes(png_bytes(entry.w, entry.h, seed=entry.seed))
        path.symlink_to(f"target_{entry.seed}.png")
    elif kind == "link_out":
        path.symlink_to(sandbox / ("outside/secret.png" if entry.seed % 2 else "user/notes.txt"))
    elif kind == "dangling":
        path.symlink_to(sandbox / "nowhere.png")
    elif kind == "loop":
        path.symlink_to(entry.name)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "sub":
        (folder / "sub").mkdir(exist_ok=True)
        (folder / "sub" / entry.name).write_bytes(png_bytes(entry.w, entry.h, seed=entry.seed))


def _prepare_output(case: FolderCase, sandbox: Path, images: Path) -> tuple[Path, list[str]]:
    """The output folder of the case and the user's files in it (relative to the sandbox)."""
    from rcnn_trainer.run_folder import MARKER, _write_marker

    out = {"nested": sandbox / "out" / "a" / "b", "images_folder": images,
           "inside_images": images / "out"}.get(case.output, sandbox / "out")
    kind, mine = case.output, {}
    if kind == "empty":
        out.mkdir()
    elif kind == "user_files":
        mine = {"notes.txt": b"mine\n", "data.csv": b"a,b\n1,2\n", "sub/keep.txt": b"x"}
    elif kind == "user_outputs":
        mine = {"predictions.json": b"[] # the user's\n", "vis/mine.png": png_bytes(5, 5), "summary.json": b"{}"}
    elif kind == "is_file":
        out.write_bytes(b"the user's file named like the output folder\n")
        return out, [os.path.relpath(out, sandbox)]
    elif kind == "foreign_marker":
        mine = {MARKER: b'{"tool": "something else"}', "notes.txt": b"mine\n"}
    if mine:
        for rel, data in mine.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
    if kind in ("ours_earlier", "ours_links", "vis_link"):
        out.mkdir()
        _write_marker(out / MARKER, "rcnn-predict")
    if kind == "ours_earlier":
        (out / "predictions.json").write_text("[]")
    if kind in ("user_links", "ours_links"):
        out.mkdir(exist_ok=True)
        for name, target in (("predictions.jsonl", "user/notes.txt"), ("summary.json", "user/config.yaml"),
                             ("predictions.json", "outside/secret.png")):
            (out / name).symlink_to(sandbox / target)
    if kind == "vis_link":
        (out / "vis").symlink_to(sandbox / "user" / "dir")
    if kind == "marker_link":
        (sandbox / "user" / "ours.json").write_text('{"tool": "rcnn_trainer"}')
        out.mkdir()
        (out / MARKER).symlink_to(sandbox / "user" / "ours.json")
    kept = [os.path.relpath(out / rel, sandbox) for rel in mine]
    if kind == "images_folder":
        kept = [os.path.relpath(p, sandbox) for p in _walk(images)]
    if case.overwrite:  # the user asked for these to be replaced
        kept = [rel for rel in kept if os.path.relpath(sandbox / rel, out).split(os.sep)[0] not in REPLACED]
    return out, kept


REPLACED = ("predictions.json", "predictions.jsonl", "summary.json", "run.json")


def _walk(folder: Path):
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            yield os.path.join(root, name)


def _inputs(case: FolderCase, images: Path, sandbox: Path) -> list[str]:
    found = []
    for item in case.inputs:
        if item == "folder":
            found.append(str(images))
        elif item == "folder_dotdot":
            found.append(str(images / ".." / images.name))
        elif item == "glob":
            found.append(str(images / "*"))
        elif item == "glob_recursive":
            found.append(str(images / "**" / "*"))
        elif item == "file" and case.entries:
            found.append(str(images / case.entries[len(found) % len(case.entries)].name))
        elif item == "missing":
            found.append(str(images / "missing.png"))
        elif item == "user_link":
            found.append(str(sandbox / "user" / "notes.txt"))
    return found or [str(images)]


def try_predict(case: FolderCase, sandbox: Path, model) -> str:
    """Run rcnn-predict's run_prediction on the case in a new `sandbox` folder: 'ok' or
    'user_error'; nothing written outside its output folder, the user's files unchanged, and a
    summary consistent with predictions.jsonl."""
    from rcnn_trainer.errors import UserError
    from rcnn_trainer.infer.predict import run_prediction

    cfg, checkpoint = model
    sandbox.mkdir(parents=True)
    plant_user_files(sandbox)
    images = sandbox / "images"
    images.mkdir()
    for entry in case.entries:
        _write_entry(images, entry, sandbox)
    out, kept = _prepare_output(case, sandbox, images)
    before = snapshot(sandbox)
    outcome = "ok"
    with guarded(writable=(out,)) as guard:
        try:
            summary = run_prediction(cfg, checkpoint, _inputs(case, images, sandbox), out, score_thresh=case.score,
                                     draw=case.draw, progress=False, log=lambda _: None, overwrite=case.overwrite)
        except UserError as err:
            assert str(err).strip(), "an empty message"
            outcome = "user_error"
    assert not guard.violations, guard.violations[:3]
    skip = [os.path.relpath(out, sandbox)] if case.output != "is_file" else []
    found = changes(before, snapshot(sandbox), skip=skip, keep=kept)
    assert not found, found[:5]
    if outcome == "ok":
        lines = (out / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == summary["images"] + summary["skipped"], (len(lines), summary)
        assert json.loads((out / "summary.json").read_text())["images"] == summary["images"] > 0
    return outcome


INIT_FILLS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
              "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")


@contextlib.contextmanager
def init_fills_skipped():
    """torch.nn.init's fills as no-ops. run_prediction builds the model, then loads every weight
    from the checkpoint (load_state_dict is strict), so the random fills it makes first are
    overwritten: they were 0.14 s of a 0.33 s case (resnet18). Every line of rcnn_trainer still runs."""
    from torch.nn import init

    saved = {name: getattr(init, name) for name in INIT_FILLS}
    for name in INIT_FILLS:
        setattr(init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fill in saved.items():
            setattr(init, name, fill)


def tiny_model(folder: Path):
    """(config, checkpoint) of a tiny untrained detector (resnet18, 16 FPN channels, 64 px); bf16
    autocast where the CPU has it, so that the backbone is not frozen to TorchScript per run."""
    import torch
    from conftest import tiny_dict

    from rcnn_trainer.config_loader import config_to_dict, validate_config
    from rcnn_trainer.model.build import build_model

    cfg = validate_config(tiny_dict(folder, solver={"amp": True}), source="hostile_inputs")
    torch.manual_seed(0)
    checkpoint = folder / "model_final.pth"
    torch.save({"model": build_model(cfg.model).state_dict(), "config": config_to_dict(cfg),
                "class_names": ["square", "circle", "triangle", "cross"],
                "label_to_cat_id": {label: label for label in range(1, 5)}}, checkpoint)
    return cfg, checkpoint
