"""Thousands of hostile inputs through the real code, with the file system watched (issue 37).

Kinds, each drawn by hypothesis from the strategies in tests/fuzz_inputs.py,
tests/hostile_configs.py and tests/hostile_folders.py (a failing case is shrunk and printed):
- config: mutated config values (deep, huge, path-like, wrong types; `--configs`) and YAML texts
  (alias bombs, deep flow and block nesting, tags, bad bytes, `_base_` at absolute, missing,
  device, /proc, directory, self, cyclic, diamond, doubling and wide includes; `--yaml`);
- coco: mutated annotation files (the same edits; half with every bad-record policy 'drop'),
  indexed with every image header read, every item loaded and the evaluation index built;
- predict: folders of images (0-byte, truncated, 200-megapixel, odd modes, links in and out,
  folders named x.png, FIFOs, path-like names) through run_prediction with a tiny untrained model,
  into output folders that are new, hold the user's files, links or an earlier run.
Then fixed scenarios (tests/hostile_scenarios.py): files planted in the torch hub cache, links
and odd files planted in a run folder (claim + lock), and real tiny training runs into run folders
holding planted links (refused) and the user's files (trained beside them).

Every case must end in success or UserError (a traceback is a bug), within --time-limit seconds,
write nothing outside its own output folder, change none of the user's files, and (COCO) read
nothing outside its folder. Prints counts per kind and outcome; exit 1 on any violation.

    python tools/hostile_inputs.py --configs 2000 --yaml 2000 --coco 2000 --predict 2000
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fuzz_inputs import mutated, try_coco, try_config, valid_coco, valid_config
from hostile_configs import try_config_text, yaml_cases
from hostile_folders import image_folders, init_fills_skipped, tiny_model, try_predict
from hostile_scenarios import (
    HUB_PLANTS,
    RUN_PLANTS,
    train_with_planted_links,
    try_hub_cache,
    try_run_folder,
)


class Hang(BaseException):
    """Past the time limit. A BaseException: code under test that catches Exception (PIL's
    decoders are wrapped so) must not swallow it."""


def _alarm(_signum, _frame):
    raise Hang()


def run_kind(kind: str, cases: int, random_seed: int, time_limit: int, root: Path) -> tuple[Counter, float]:
    """Run `cases` drawn cases of `kind`; returns the outcome counts and the slowest case's seconds."""
    outcomes: Counter = Counter()
    slowest = [0.0]
    counter = itertools.count()
    folder = root / kind
    folder.mkdir()
    if kind in ("coco", "config"):
        valid = valid_coco(folder) if kind == "coco" else valid_config(folder)
        strategy = (st.tuples(mutated(valid, max_steps=6, max_size=100_000), st.booleans()) if kind == "coco"
                    else mutated(valid, max_steps=3))
    elif kind == "yaml":
        strategy = yaml_cases()
    else:
        model = tiny_model(folder)
        strategy = image_folders()

    def attempt(case):
        if kind == "coco":
            return try_coco(case[0], folder, drop=case[1])
        if kind == "config":
            return try_config(case, folder)
        sandbox = folder / f"case{next(counter)}"
        try:
            return try_config_text(case, sandbox) if kind == "yaml" else try_predict(case, sandbox, model)
        finally:
            shutil.rmtree(sandbox, ignore_errors=True)

    current = [None]
    exercised: Counter = Counter()

    @seed(random_seed)
    # no explain phase: it traces every line while shrinking, 10-50x slower, and a case that takes
    # a second became a 20 s "hang" hiding the failure being shrunk
    @settings(max_examples=cases, deadline=None, database=None, print_blob=True,
              phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def case(drawn):
        current[0] = drawn
        if kind == "predict":  # what the cases held: entry kinds, output folder kinds
            exercised.update(f"entry:{e.kind}" for e in drawn.entries)
            exercised[f"output:{drawn.output}"] += 1
        elif kind == "yaml":
            exercised.update(note.split(" ")[0] for note in drawn.notes[1:])
        started = time.perf_counter()
        signal.alarm(time_limit)
        try:
            outcomes[attempt(drawn)] += 1
        finally:
            signal.alarm(0)
            slowest[0] = max(slowest[0], time.perf_counter() - started)

    try:
        with init_fills_skipped() if kind == "predict" else contextlib.nullcontext():
            case()
    except Hang:
        outcomes["hang"] += 1
        print(f"[{kind}] HANG over {time_limit} s on {current[0]!r:.3000}; it was here:\n"
              f"{traceback.format_exc()[-4000:]}")
    except Exception:  # noqa: BLE001 - the bug being looked for
        outcomes["traceback" if not isinstance(sys.exc_info()[1], AssertionError) else "violation"] += 1
        print(f"[{kind}] FAILED (shrunk; the falsifying example is printed above)\n{traceback.format_exc()[-12000:]}")
    if exercised:
        print(f"[{kind}] the cases held: {dict(sorted(exercised.items()))}")
    return outcomes, slowest[0]


def run_fixed(time_limit: int, root: Path, train: bool) -> Counter:
    """The fixed scenarios, each once: {'scenario: outcome': 1}."""
    outcomes: Counter = Counter()
    scenarios = [(f"hub_cache:{p}", lambda s, p=p: try_hub_cache(p, s)) for p in HUB_PLANTS]
    scenarios += [(f"run_folder:{p}", lambda s, p=p: try_run_folder(p, s)) for p in RUN_PLANTS]
    if train:
        scenarios.append(("train_with_planted_links", train_with_planted_links))
    for k, (name, scenario) in enumerate(scenarios):
        signal.alarm(time_limit * (6 if name.startswith("train") else 1))
        try:
            outcomes[f"{name}: {scenario(root / f'fixed{k}')}"] += 1
        except Hang:
            outcomes[f"{name}: hang"] += 1
        except BaseException:  # noqa: BLE001
            failed = "violation" if isinstance(sys.exc_info()[1], AssertionError) else "traceback"
            outcomes[f"{name}: {failed}"] += 1
            print(f"[fixed] {name}: {failed.upper()}\n{traceback.format_exc()[-6000:]}")
        finally:
            signal.alarm(0)
    return outcomes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=int, default=2000, help="mutated config values")
    p.add_argument("--yaml", type=int, default=2000, help="config YAML texts")
    p.add_argument("--coco", type=int, default=2000, help="mutated annotation files")
    p.add_argument("--predict", type=int, default=2000, help="image folders through run_prediction")
    p.add_argument("--no-fixed", action="store_true", help="skip the fixed scenarios")
    p.add_argument("--no-train", action="store_true", help="skip the one training run of the fixed scenarios")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--time-limit", type=int, default=20, help="seconds per case")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)  # the forward passes are tiny; leave the other core to others
    warnings.filterwarnings("ignore")  # PIL's about the truncated and odd files it is given
    signal.signal(signal.SIGALRM, _alarm)
    bad = 0
    with tempfile.TemporaryDirectory(prefix="hostile_") as tmp:
        root = Path(tmp)
        for kind, cases in (("config", args.configs), ("yaml", args.yaml), ("coco", args.coco),
                            ("predict", args.predict)):
            if not cases:
                continue
            started = time.time()
            outcomes, slowest = run_kind(kind, cases, args.seed, args.time_limit, root)
            print(f"{kind}: {sum(outcomes.values())} cases in {time.time() - started:.0f} s (slowest "
                  f"{slowest:.1f} s): {dict(sorted(outcomes.items()))}", flush=True)
            bad += outcomes["traceback"] + outcomes["hang"] + outcomes["violation"]
        if not args.no_fixed:
            started = time.time()
            outcomes = run_fixed(args.time_limit, root, train=not args.no_train)
            print(f"fixed scenarios in {time.time() - started:.0f} s:")
            for name, n in sorted(outcomes.items()):
                print(f"  {name}")
            bad += sum(n for name, n in outcomes.items() if name.endswith(("traceback", "hang", "violation")))
    print("OK: no traceback, hang or violation" if not bad else f"FAILED: {bad} kinds or scenarios failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
