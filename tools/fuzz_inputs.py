"""Thousands of generated bad COCO files and configs through the real loaders.

Each case must load or raise UserError (what the CLI turns into exit 2 with a message) within
--time-limit seconds; a traceback or a hang is counted, printed and makes the exit code 1.

    python tools/fuzz_inputs.py --coco 2000 --configs 2000
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fuzz_inputs import mutate, try_coco, try_config, valid_coco, valid_config  # noqa: E402


class Hang(Exception):
    pass


def _alarm(_signum, _frame):
    raise Hang()


def run(kind: str, cases: int, seed: int, time_limit: int) -> Counter:
    outcomes: Counter = Counter()
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for case in range(cases):
            rng = random.Random(seed * 1_000_003 + case)
            base = valid_coco(folder) if kind == "coco" else valid_config(folder)
            data = mutate(base, rng, steps=1 + case % 6)
            signal.alarm(time_limit)
            try:
                outcomes[(try_coco if kind == "coco" else try_config)(data, folder)] += 1
            except Hang:
                outcomes["hang"] += 1
                print(f"[{kind} case {case}] HANG over {time_limit} s")
            except Exception:  # noqa: BLE001 - the bug being looked for
                outcomes["traceback"] += 1
                print(f"[{kind} case {case}] TRACEBACK\n{traceback.format_exc()[-1500:]}")
            finally:
                signal.alarm(0)
    return outcomes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--coco", type=int, default=2000)
    p.add_argument("--configs", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--time-limit", type=int, default=20)
    args = p.parse_args()
    bad = 0
    for kind, cases in (("coco", args.coco), ("config", args.configs)):
        outcomes = run(kind, cases, args.seed, args.time_limit)
        print(f"{kind}: {cases} cases: {dict(outcomes)}")
        bad += outcomes["traceback"] + outcomes["hang"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
