"""Cascade R-CNN vs one RoI stage: the same recipe, data, seed and iterations, side by side.

  python tools/cascade_bench.py --datasets synthetic digits_large glyphs_large --masks glyphs_large \
      --iters 300 --batch 4 --seeds 0 1 --data-dir /tmp/bench --lock /tmp/heavy.lock --out /tmp/cascade_bench.json

Each run is the real `rcnn-train` command on --recipe (config.yaml by default) with the data,
batch, iterations and seed overridden; the cascade arm adds `model.roi.cascade={}` (detectron2's
3 stages at IoU 0.5 / 0.6 / 0.7), nothing else. Both are scored by the run's own COCO evaluation
on the same val split. Reported per dataset: AP, AP75 (and segm AP with --masks), the median
s/iter of each arm, the cascade's gains and its time ratio, over the seeds (mean, and the
spread of the one-stage AP across seeds beside the gain). With --lock each training run
waits for that file's flock (a shared machine runs one heavy job at a time); results are
cached in --out, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_bench import DATASETS, data_overrides  # noqa: E402  (tools/ is not a package)

ARMS = {"one_stage": [], "cascade": ["model.roi.cascade={}"]}
# --wrong-coder-on: a cascade whose stage 3 box coder weights are 30x too small (its targets then sit
# inside smooth L1's quadratic zone and barely train it): what cascade_stage_not_improving is for
WRONG_CODER = {"cascade_wrong_coder_s3": ["model.roi.cascade={box_coder_weights: "
                                          "[[10, 10, 5, 5], [20, 20, 10, 10], [1, 1, 0.5, 0.5]]}"]}
METRICS = ("AP", "AP50", "AP75", "segm_AP", "segm_AP75")


def train_once(recipe: str, overrides: list[str], workdir: Path, threads: int, lock: Path | None) -> dict:
    out = workdir
    cmd = [sys.executable, "-m", "rcnn_trainer.cli", "train", "--config", recipe, "--output-dir", str(out),
           "--no-progress", f"train.threads={threads}", *overrides]
    if lock is not None:
        cmd = ["flock", str(lock), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"rcnn-train failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [r for r in records if r["type"] == "eval"][-1]
    train = [r for r in records if r["type"] == "train"]
    means = [r for r in records if r["type"] == "monitor" and any(k.startswith("mean/roi/stage_iou") for k in r)]
    stage_ious = {k[len("mean/"):]: v for k, v in means[-1].items() if k.startswith("mean/roi/stage_iou")} \
        if means else {}
    return {**{k: final[k] for k in METRICS if k in final}, "s_per_iter": statistics.median(r["time"] for r in train),
            "wall_s": wall, "alarms": [f"{r['name']}@{r['iter']}" for r in records if r["type"] == "alarm"],
            "stage_ious": stage_ious}


def run_all(args) -> dict:
    cache = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for dataset in args.datasets:
        masks = dataset in args.masks
        for seed in args.seeds:
            arms = {**ARMS, **(WRONG_CODER if dataset in args.wrong_coder_on else {})}
            for arm, extra in arms.items():
                key = f"{dataset}/{arm}/seed{seed}/iters{args.iters}/batch{args.batch}/masks{int(masks)}"
                if key in cache:
                    continue
                overrides = data_overrides(dataset, args.data_dir, args.batch, args.iters, seed) + extra
                overrides += ["model.mask.enabled=true"] if masks else []
                result = train_once(args.recipe, overrides, args.work_dir / key.replace("/", "_"), args.threads,
                                    args.lock)
                cache[key] = result
                args.out.write_text(json.dumps(cache, indent=1))
                print(f"{key}: AP {result['AP']:.3f} AP75 {result['AP75']:.3f}"
                      + (f" segm AP {result['segm_AP']:.3f}" if "segm_AP" in result else "")
                      + f"  {result['s_per_iter']:.3f} s/it  alarms {result['alarms'] or 'none'}"
                      + f"  stage IoUs {({k: round(v, 3) for k, v in result['stage_ious'].items()})}", flush=True)
    return cache


def table(cache: dict, args) -> str:
    lines = ["| dataset | seeds | AP one / cascade (gain) | AP75 one / cascade (gain) | segm AP one / cascade | "
             "s/iter one / cascade (ratio) | one-stage AP spread over seeds |", "|---|---|---|---|---|---|---|"]
    for dataset in args.datasets:
        masks = int(dataset in args.masks)
        runs = {arm: [cache[f"{dataset}/{arm}/seed{s}/iters{args.iters}/batch{args.batch}/masks{masks}"]
                      for s in args.seeds] for arm in ARMS}

        def mean(arm, key):
            values = [r[key] for r in runs[arm] if key in r]
            return statistics.mean(values) if values else float("nan")

        one_ap = [r["AP"] for r in runs["one_stage"]]
        spread = max(one_ap) - min(one_ap) if len(one_ap) > 1 else float("nan")
        segm = f"{mean('one_stage', 'segm_AP'):.3f} / {mean('cascade', 'segm_AP'):.3f}" if masks else "-"
        lines.append(
            f"| {dataset}{' (masks)' if masks else ''} | {len(args.seeds)} | {mean('one_stage', 'AP'):.3f} / "
            f"{mean('cascade', 'AP'):.3f} ({mean('cascade', 'AP') - mean('one_stage', 'AP'):+.3f}) | "
            f"{mean('one_stage', 'AP75'):.3f} / {mean('cascade', 'AP75'):.3f} "
            f"({mean('cascade', 'AP75') - mean('one_stage', 'AP75'):+.3f}) | {segm} | "
            f"{mean('one_stage', 's_per_iter'):.3f} / {mean('cascade', 's_per_iter'):.3f} "
            f"({mean('cascade', 's_per_iter') / mean('one_stage', 's_per_iter'):.2f}x) | {spread:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="config.yaml")
    p.add_argument("--datasets", nargs="+", default=["synthetic", "digits_large", "glyphs_large"], choices=DATASETS)
    p.add_argument("--masks", nargs="*", default=[], help="datasets on which both arms train masks too")
    p.add_argument("--wrong-coder-on", nargs="*", default=[], help="datasets on which a mis-set cascade runs too "
                   "(its alarms and stage IoUs printed; not in the table)")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/cascade_bench_runs"))
    p.add_argument("--lock", type=Path, default=None, help="flock this file around each training run")
    p.add_argument("--out", type=Path, default=Path("cascade_bench.json"))
    args = p.parse_args(argv)
    cache = run_all(args)
    print(f"\n{args.iters} iterations, batch {args.batch}, recipe {args.recipe}, seeds {args.seeds}")
    print(table(cache, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
