"""Config files as hostile YAML text (issue 37): alias bombs, self-referencing aliases, merge
keys, deep flow and block nesting, tags, odd scalars, bad bytes, oversized files, duplicate keys,
KEY=VALUE overrides, and `_base_` at odd paths (absolute, missing, /proc, devices, a folder,
itself, links, a FIFO, names over NAME_MAX or with a NUL, chains, cycles, diamonds, doubling and
wide includes). `try_config_text` loads one case: it loads or is a UserError naming one of its
files; nothing is written, no tag runs. Shared by tests/test_hostile_inputs.py and
tools/hostile_inputs.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from fs_guard import changes, guarded, snapshot
from hypothesis import strategies as st

REPO_CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"


@dataclass
class YamlCase:
    """main.yaml's text and the other files of the case folder ('{case}' in a text is the folder,
    '{repo}' the repository's config.yaml). A file is text, bytes, or one of DIR, FIFO, ('link', to)."""

    main: str
    files: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def __repr__(self) -> str:
        return f"YamlCase({', '.join(self.notes)}; main {len(self.main)} chars; files {sorted(self.files)[:8]})"


DIR, FIFO = "<dir>", "<fifo>"
TAGS = ["!!python/object/apply:os.system ['touch {case}/pwned']", "!!python/name:os.system", "!!binary aGVsbG8=",
        "!!timestamp 2001-12-14", "!!set {a, b}", "!!float .nan", "!!int 0x1F", "!!str 1", "!!omap [a: 1]",
        "!foo bar", "!!pairs [a: 1]", "!!bool yes", "!!python/tuple [1, 2]", "!<tag:yaml.org,2002:int> 3"]
ODD_SCALARS = ["1e999", ".inf", "-.inf", ".nan", "0x7fffffffffffffffffff", "1_000", "~", "0o17", "1:20", "2001-01-01",
               "'\\u0000'", '"\\0"', '"\\ud800"', "|\n  two\n  lines", "&a 1", "*undefined", "? complex\n: key",
               "[1, 2", "{a: 1", "'unterminated", "@reserved", "`backtick", "%TAG", "- 1\n- 2", "- 1\n  x: 2"]
ODD_BASES = ["/nonexistent/x.yaml", "/etc/passwd", "/proc/self/mem", "/proc/self/environ", "/proc/self/status",
             "/dev/zero", "/dev/null", "/", "/proc", ".", "..", "", "~/x.yaml", "%2e%2e/x.yaml", "C:\\x.yaml",
             "../" * 40 + "etc/passwd", "a" * 300 + ".yaml", "a" * 5000, "x\0y.yaml", "main.yaml", "sub",
             "link.yaml", "dangling.yaml", "loop.yaml", "fifo.yaml", "empty.yaml", "null.yaml", "list.yaml",
             "binary.yaml", "big.yaml", "nested_base.yaml", "{repo}", "sub/../main.yaml"]
BASE_FILES = {"sub": DIR, "link.yaml": ("link", str(REPO_CONFIG)), "dangling.yaml": ("link", "missing.yaml"),
              "loop.yaml": ("link", "loop.yaml"), "fifo.yaml": FIFO, "empty.yaml": "", "null.yaml": "null\n",
              "list.yaml": "- 1\n- 2\n", "binary.yaml": bytes(range(256)) * 4, "big.yaml": ("sparse", 2 << 20),
              "nested_base.yaml": "model: {_base_: x.yaml}\n"}


def _flow_bomb(levels: int, width: int) -> str:
    return "[" + ", ".join([f"&a0 [{', '.join(['x'] * width)}]"]
                           + [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]) + "]"


@st.composite
def yaml_cases(draw) -> YamlCase:
    start = draw(st.sampled_from(["base", "repo_text", "minimal", "empty"]))
    main = {"base": "_base_: {repo}\noutput_dir: {case}/run\n", "repo_text": REPO_CONFIG.read_text(),
            "minimal": "seed: 1\n", "empty": ""}[start]
    case = YamlCase(main, notes=[start])
    key = lambda: draw(st.sampled_from(["seed", "extra", "model", "data", "solver", "_base_"]))
    for edit in draw(st.lists(st.sampled_from(YAML_EDITS), min_size=1, max_size=3)):
        case.notes.append(edit)
        if edit == "alias_bomb":
            levels, width = draw(st.integers(1, 12)), draw(st.integers(2, 10))
            case.main += f"\n{key()}: {_flow_bomb(levels, width)}\n"
            case.notes[-1] += f" {width}^{levels}"
        elif edit == "self_alias":
            case.main += f"\n{key()}: " + draw(st.sampled_from(["&r [*r]", "&r {a: *r}", "&r [1, [2, *r]]"])) + "\n"
        elif edit == "merge_key":
            case.main += draw(st.sampled_from([
                "\nx: &d {lr: 0.1, momentum: 0.9}\nsolver: {<<: *d}\n", "\nsolver: {<<: [1, 2]}\n",
                "\nx: &d {a: 1}\nsolver: {<<: [*d, *d, *d]}\n", "\nsolver: {<<: *nowhere}\n", "\n<<: {seed: 3}\n"]))
        elif edit == "deep_flow":
            n = draw(st.one_of(st.integers(2, 40), st.integers(2, 20_000)))
            inner = draw(st.sampled_from(["[", "{a: "]))
            case.main += f"\n{key()}: " + inner * n + "1" * (inner != "[") + ("]" if inner == "[" else "}") * n + "\n"
            case.notes[-1] += f" {n}"
        elif edit == "deep_block":
            n = draw(st.integers(2, 300))
            case.main += f"\n{key()}:\n" + "".join("  " * (i + 1) + "a:\n" for i in range(n)) + "  " * (n + 1) + "1\n"
            case.notes[-1] += f" {n}"
        elif edit == "tag":
            case.main += f"\n{key()}: {draw(st.sampled_from(TAGS))}\n"
        elif edit == "odd_scalar":
            case.main += f"\n{key()}: {draw(st.sampled_from(ODD_SCALARS))}\n"
        elif edit == "bytes":
            case.main = draw(st.sampled_from(["bom", "latin1", "nul", "tab", "crlf", "esc", "utf16", "cut"])) \
                + "\0" + case.main  # decoded in write_yaml_case
        elif edit == "size":
            case.main += "# padding\n" * draw(st.sampled_from([20_000, 120_000]))  # 200 KB, 1.2 MB
        elif edit == "duplicate_key":
            case.main += "\nseed: 1\nseed: 2\nmodel: {}\nmodel: {num_classes: 3}\n"
        elif edit == "base":
            bases = draw(st.lists(st.one_of(st.sampled_from(ODD_BASES), st.sampled_from(["chain", "cycle",
                                                                                          "diamond", "doubling",
                                                                                          "wide"])),
                                  min_size=1, max_size=3))
            entries = [_base_entry(draw, case, b) for b in bases]
            form = draw(st.sampled_from(["one", "list", "odd"]))
            value = (json.dumps(entries[0]) if form == "one" else json.dumps(entries) if form == "list"
                     else draw(st.sampled_from(["1", "null", "[]", "{}", "true", "[[a.yaml]]", "{a: b}", "''"])))
            case.main += f"\n_base_: {value}\n"
            case.notes[-1] += f" {form} {[b[:20] for b in bases]}"
        elif edit == "override":
            case.overrides.append(draw(st.sampled_from(OVERRIDES)))
    return case


YAML_EDITS = ("alias_bomb", "self_alias", "merge_key", "deep_flow", "deep_block", "tag", "odd_scalar", "bytes",
              "size", "duplicate_key", "base", "base", "base", "override")  # _base_ paths: the most to try
OVERRIDES = ["seed=" + "[" * 50 + "]" * 50, "seed=" + "[" * 5000 + "]" * 5000, "a.b.c=1", "=", "seed", "seed==1",
             "model.backbone.weights=/etc/passwd", "output_dir=../../x", "data..x=1", "_base_=x.yaml",
             "seed=&a [*a]", "seed=!!python/name:os.system", "solver.lr=.nan", "seed=" + "1" * 2_000_000,
             "model.backbone=[1, 2]", "data.train.ann_file=/dev/zero", "seed=\0"]


def _base_entry(draw, case: YamlCase, kind: str) -> str:
    """A _base_ entry; the files it needs go into the case."""
    n = draw(st.integers(2, 30))
    if kind == "chain":  # c0 -> c1 -> ... -> repo: past the depth limit of 16 from 17 files
        case.files.update({f"c{i}.yaml": f"_base_: c{i + 1}.yaml\nseed: {i}\n" for i in range(n)})
        case.files[f"c{n}.yaml"] = "_base_: {repo}\n"
        return "c0.yaml"
    if kind == "cycle":
        case.files.update({"y0.yaml": "_base_: y1.yaml\n", "y1.yaml": "_base_: [y0.yaml]\n"})
        return "y0.yaml"
    if kind == "diamond":
        case.files.update({"b.yaml": "_base_: d.yaml\nseed: 2\n", "c.yaml": "_base_: d.yaml\nseed: 3\n",
                           "d.yaml": "_base_: {repo}\n", "top.yaml": "_base_: [b.yaml, c.yaml]\n"})
        return "top.yaml"
    if kind == "doubling":  # each includes the next twice: 2^n reads without memoization
        case.files.update({f"e{i}.yaml": f"_base_: [e{i + 1}.yaml, e{i + 1}.yaml]\n" for i in range(n)})
        case.files[f"e{n}.yaml"] = "seed: 5\n"
        return "e0.yaml"
    if kind == "wide":  # distinct files, past the limit of 64 from 64
        width = draw(st.integers(2, 80))
        case.files.update({f"w{i}.yaml": f"seed: {i}\n" for i in range(width)})
        case.files["wide.yaml"] = "_base_: " + json.dumps([f"w{i}.yaml" for i in range(width)]) + "\n"
        return "wide.yaml"
    if kind in BASE_FILES:
        case.files[kind] = BASE_FILES[kind]
    return kind


def write_yaml_case(case: YamlCase, folder: Path) -> Path:
    subs = {"{case}": str(folder), "{repo}": str(REPO_CONFIG)}

    def fill(text: str) -> str:
        for k, v in subs.items():
            text = text.replace(k, v)
        return text
    for name, content in case.files.items():
        path = folder / name
        if content == DIR:
            path.mkdir()
        elif content == FIFO:
            os.mkfifo(path)
        elif isinstance(content, tuple) and content[0] == "link":
            path.symlink_to(content[1])
        elif isinstance(content, tuple) and content[0] == "sparse":
            with open(path, "wb") as f:
                f.truncate(content[1])
        else:
            path.write_bytes(content if isinstance(content, bytes) else fill(content).encode())
    text = fill(case.main)
    form, _, rest = text.partition("\0") if text.split("\0", 1)[0] in BYTE_FORMS else ("", "", text)
    (folder / "main.yaml").write_bytes(BYTE_FORMS[form](rest) if form else rest.encode("utf-8", "surrogatepass"))
    return folder / "main.yaml"


BYTE_FORMS = {"bom": lambda t: b"\xef\xbb\xbf" + t.encode(), "latin1": lambda t: t.encode() + b"\nname: caf\xe9\n",
              "nul": lambda t: t.encode() + b"\nseed: 1\x00\n", "tab": lambda t: b"model:\n\tx: 1\n" + t.encode(),
              "crlf": lambda t: t.replace("\n", "\r\n").encode(), "esc": lambda t: t.encode() + b"\nseed: \x1b[31m\n",
              "utf16": lambda t: t.encode("utf-16"), "cut": lambda t: t.encode()[: len(t) // 2] + b"\xe2\x82"}


def try_config_text(case: YamlCase, folder: Path) -> str:
    """Load the case's main.yaml (with its overrides) from a new `folder`: 'loaded' or 'user_error'
    naming one of the case's files (or the override); nothing written or changed anywhere."""
    from rcnn_trainer.config_loader import load_config
    from rcnn_trainer.errors import UserError

    folder.mkdir(parents=True)
    main = write_yaml_case(case, folder)
    before = snapshot(folder)
    outcome = "loaded"
    with guarded(writable=()) as guard:
        try:
            load_config(main, case.overrides).model_dump()
        except UserError as err:
            named = [str(folder), "main.yaml", *case.files, "override", "_base_", "/"]
            assert any(name in str(err) for name in named), f"the message names no file: {str(err)[:300]}"
            outcome = "user_error"
    assert not guard.violations, guard.violations[:3]
    assert not (folder / "pwned").exists(), "a YAML tag ran code"
    assert not changes(before, snapshot(folder)), changes(before, snapshot(folder))
    return outcome
