"""SIGKILL training, evaluation and prediction at random moments; check every output file is
complete or absent, and that `--resume` after each training kill ends equal to an uninterrupted run
(final weights and metrics.jsonl line by line, timings aside).

    python tools/kill_consistency.py --kills 20 --out /tmp/kill_check
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import tiny_dict  # noqa: E402

CLI = [sys.executable, "-m", "rcnn_trainer.cli"]
TIMING = ("time", "seconds", "img_per_s", "eta")


def run(args: list[str], kill_after: float | None = None) -> int:
    proc = subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kill_after is None:
        return proc.wait()
    try:
        return proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9


def partial_files(folder: Path) -> list[str]:
    """Files under `folder` that are not complete: unparsable json/yaml/images/checkpoints."""
    bad = []
    for path in folder.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".yaml":
                yaml.safe_load(path.read_text())
            elif path.suffix in (".png", ".jpg"):
                with Image.open(path) as img:
                    img.load()
            elif path.suffix == ".pth":
                torch.load(path, map_location="cpu", weights_only=True)
            elif path.suffix == ".jsonl":
                text = path.read_text()
                if text and not text.endswith("\n"):
                    bad.append(f"{path} (last line cut)")
                [json.loads(line) for line in text.splitlines()]
        except Exception as err:  # noqa: BLE001 - any unreadable file is what we look for
            bad.append(f"{path} ({type(err).__name__})")
    return bad


def strip_timing(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not any(t in k for t in TIMING)}
            for line in path.read_text().splitlines()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("/tmp/kill_consistency"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    raw = tiny_dict(args.out / "ref", solver={"max_iters": 8}, train={"checkpoint_period": 2, "eval_period": 4})
    config = args.out / "ref.yaml"
    config.write_text(yaml.safe_dump(raw))
    started = time.time()
    assert run(["train", "--config", str(config), "--no-progress"]) == 0
    train_seconds = time.time() - started
    reference = args.out / "ref" / "run"
    ref_weights = torch.load(reference / "model_final.pth", weights_only=True)["model"]
    ref_log = strip_timing(reference / "metrics.jsonl")
    images = args.out / "images"
    images.mkdir()
    for i in range(8):
        Image.new("RGB", (64 + 8 * i, 64), (40 * i % 255, 90, 160)).save(images / f"im{i}.png")
    failures, counts = [], {"train": 0, "eval": 0, "predict": 0}

    def command(kind: str, out: Path) -> list[str]:
        common = ["--config", str(config), "--checkpoint", str(reference / "model_final.pth"), "--no-progress"]
        extra = (["--output-dir", str(out), "--visualize", "6"] if kind == "eval"
                 else [str(images), "--output-dir", str(out), "--score-thresh", "0.0"])
        return [kind, *common, *extra]

    # kill moments are drawn within each command's own uninterrupted duration, so that they land
    duration = {"train": train_seconds}
    for kind in ("eval", "predict"):
        started = time.time()
        assert run(command(kind, args.out / f"{kind}_reference")) == 0
        duration[kind] = time.time() - started
    print(f"uninterrupted durations (s): { {k: round(v, 1) for k, v in duration.items()} }", flush=True)

    for k in range(args.kills):
        # training: kill, check, resume, compare with the uninterrupted run
        run_dir = args.out / f"train{k}"
        cfg = dict(raw, output_dir=str(run_dir))
        cfg_path = args.out / f"train{k}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        # a kill that comes after the process finished does not count: try again, on a fresh folder
        for _attempt in range(4):
            shutil.rmtree(run_dir, ignore_errors=True)
            code = run(["train", "--config", str(cfg_path), "--no-progress"],
                       kill_after=rng.uniform(0.1, 0.9) * duration["train"])
            failures += [f"train kill {k}: {b}" for b in partial_files(run_dir)]
            if code == -9:
                counts["train"] += 1
                break
        if run(["train", "--config", str(cfg_path), "--resume", "--no-progress"]) != 0:
            failures.append(f"train kill {k}: resume failed")
            continue
        weights = torch.load(run_dir / "model_final.pth", weights_only=True)["model"]
        if any(not torch.allclose(ref_weights[n].float(), weights[n].float(), atol=1e-6) for n in ref_weights):
            failures.append(f"train kill {k}: final weights differ from the uninterrupted run")
        if strip_timing(run_dir / "metrics.jsonl") != ref_log:
            failures.append(f"train kill {k}: metrics.jsonl differs from the uninterrupted run")
        # evaluation and prediction: kill, check
        for kind in ("eval", "predict"):
            out = args.out / f"{kind}{k}"
            for _attempt in range(4):
                shutil.rmtree(out, ignore_errors=True)
                code = run(command(kind, out), kill_after=rng.uniform(0.1, 0.9) * duration[kind])
                failures += [f"{kind} kill {k}: {b}" for b in partial_files(out)] if out.exists() else []
                if code == -9:
                    counts[kind] += 1
                    break
        print(f"[{k + 1}/{args.kills}] kills that landed: {counts}; failures so far: {len(failures)}", flush=True)
    print("\n".join(failures) or "no partial file, every resumed run equal to the uninterrupted one")
    print(f"kills that landed before the process finished: {counts}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
