"""Thousands of generated bad COCO files and configs through the real loaders.

Each case must load or raise UserError (what the CLI turns into exit 2 with a message naming the
file) within --time-limit seconds. Cases are drawn by hypothesis (tests/fuzz_inputs.py's
`mutated`); a traceback or a hang stops the run, is shrunk to its smallest edit, printed, and
makes the exit code 1.

    python tools/fuzz_inputs.py --coco 2000 --configs 2000
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fuzz_inputs import mutated, try_coco, try_config, valid_coco, valid_config  # noqa: E402


class Hang(Exception):
    pass


def _alarm(_signum, _frame):
    raise Hang()


def run(kind: str, cases: int, random_seed: int, time_limit: int) -> Counter:
    outcomes: Counter = Counter()
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        valid = valid_coco(folder) if kind == "coco" else valid_config(folder)
        attempt = try_coco if kind == "coco" else try_config

        @seed(random_seed)
        @settings(max_examples=cases, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(mutated(valid, max_steps=6 if kind == "coco" else 3))
        def case(data):
            signal.alarm(time_limit)
            try:
                outcomes[attempt(data, folder)] += 1
            finally:
                signal.alarm(0)

        try:
            case()
        except Hang:
            outcomes["hang"] += 1
            print(f"[{kind}] HANG over {time_limit} s (the shrunk case is above)")
        except Exception:  # noqa: BLE001 - the bug being looked for
            outcomes["traceback"] += 1
            print(f"[{kind}] TRACEBACK (shrunk)\n{traceback.format_exc()[-12000:]}")
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
