"""Each `data.augment` step against none, at one fixed budget, on real content.

  python tools/augment_bench.py --dataset glyphs_large --num-train 40 --iters 300 --out /tmp/aug.json
  python tools/augment_bench.py --gap RUN/metrics.jsonl ...   # the generalization numbers of finished runs

Every variant trains config.yaml on the same data (tools/bench_datasets.py, batch 4, its image
size, no horizontal flip: letters and digits are not mirror-safe), the same iterations and seed,
and evaluates once at the end. The table gives AP and AP50 beside the time per iteration, and
the numbers the generalization_gap alarm reads at the final evaluation: the val loss, the
training loss of the last monitor window, their ratio, val AP50 and the probe's detections at
0.5 against its ground truth. A small training set (--num-train) is where augmentation is meant
to matter (a few hundred iterations over 400 images are about 3 epochs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import bench_datasets  # noqa: E402  (tools/ is not a package)

VARIANTS = {
    "off": [],
    "vflip": ["data.augment.vflip_prob=0.5"],
    "rot90": ["data.augment.rot90_prob=0.5"],
    "color": ["data.augment.color_jitter={brightness: 0.3, contrast: 0.3, saturation: 0.3, hue: 0.05}"],
    "scale": ["data.augment.scale_jitter=[0.75, 1.25]"],
    "all": ["data.augment={vflip_prob: 0.5, rot90_prob: 0.5, scale_jitter: [0.75, 1.25], "
            "color_jitter: {brightness: 0.3, contrast: 0.3, saturation: 0.3, hue: 0.05}}"],
}


def gap_numbers(metrics: Path) -> dict:
    """What the final evaluation of a run's metrics.jsonl gives the generalization check."""
    lines = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
    evals = [l for l in lines if l["type"] == "eval"]
    monitors = [l for l in lines if l["type"] == "monitor"]
    if not evals or not monitors:
        return {"error": f"{metrics}: no evaluation or monitor line"}
    last, window = evals[-1], monitors[-1]
    times = [l["time"] for l in lines if l["type"] == "train" and "time" in l]
    val, train = last.get("val/loss", float("nan")), window.get("mean/loss", float("nan"))
    return {"iter": last["iter"], "AP": last["AP"], "AP50": last["AP50"], "val_loss": val, "train_loss": train,
            "ratio": val / train if train else float("inf"), "probe_dets@0.5": window.get("dets@0.5"),
            "probe_gt": window.get("gt_per_image"), "probe_fg_mass": window.get("probe/fg_mass"),
            "s_per_iter": statistics.median(times) if times else None,
            "alarms": sorted({l["name"] for l in lines if l["type"] == "alarm"}),
            "gap_fires": gap_fires(last, window)}


def gap_fires(evaluation: dict, window: dict) -> bool:
    """Whether this checkout's generalization_gap check (default limits) fires on these numbers:
    a replay, for runs trained before the check existed."""
    from rcnn_trainer.monitor.checks import check_generalization_gap
    from rcnn_trainer.monitor.probe import ClassDiagnosis, ProbeResult
    from rcnn_trainer.monitor.threshold_counts import ThresholdCounts

    thresholds = sorted(float(k[len("dets@"):]) for k in window if k.startswith("dets@"))
    counts = ThresholdCounts(tuple(thresholds), tuple(window[f"dets@{t:g}"] for t in thresholds),
                             window["gt_per_image"])
    probe = ProbeResult(counts, ClassDiagnosis(*[float("nan")] * 5))
    numbers = {"iter": evaluation["iter"], "val_loss": evaluation.get("val/loss", float("nan")),
               "train_loss": window.get("mean/loss", float("nan")), "AP": evaluation["AP"], "AP50": evaluation["AP50"]}
    return check_generalization_gap(numbers, probe, []) is not None


def run_variant(name: str, data: list[str], iters: int, threads: int, workdir: Path) -> dict:
    out = workdir / name
    cmd = [sys.executable, "-m", "rcnn_trainer.cli", "train", "--config", str(REPO / "config.yaml"),
           "--output-dir", str(out), "--no-progress", f"train.threads={threads}", f"solver.max_iters={iters}",
           *data, *VARIANTS[name]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": name, "exit": proc.returncode, "error": proc.stderr[-2000:]}
    return {"variant": name, "exit": 0, **gap_numbers(out / "metrics.jsonl")}


def data_overrides(dataset: str, data_dir: Path, num_train: int, num_val: int, seed: int) -> list[str]:
    spec = bench_datasets.SPECS[dataset]
    folder = bench_datasets.ensure(dataset, data_dir / f"{dataset}_{num_train}_{num_val}", num_train, num_val)
    return [f"data.train={{ann_file: '{folder / 'train.json'}', img_dir: '{folder / 'images'}'}}",
            f"data.val={{ann_file: '{folder / 'val.json'}', img_dir: '{folder / 'images'}'}}",
            "data.batch_size=4", f"data.min_size={spec.size}", f"data.max_size={spec.size}",
            f"data.hflip_prob={0.5 if spec.mirror_safe else 0.0}", f"seed={seed}"]


def format_table(rows: list[dict]) -> str:
    head = ("| variant | AP | AP50 | s/iter | val loss | train loss | val/train | probe dets@0.5 / GT | alarms |\n"
            "|---|---|---|---|---|---|---|---|---|")
    body = []
    for r in rows:
        if r.get("exit"):
            body.append(f"| {r['variant']} | failed (exit {r['exit']}) |||||||| ")
            continue
        body.append(f"| {r['variant']} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['s_per_iter']:.2f} | {r['val_loss']:.3f} | "
                    f"{r['train_loss']:.3f} | {r['ratio']:.2f} | {r['probe_dets@0.5']:.2f} / {r['probe_gt']:.2f} | "
                    f"{', '.join(r['alarms']) or 'none'} |")
    return "\n".join([head, *body])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="glyphs_large", choices=sorted(bench_datasets.SPECS))
    p.add_argument("--num-train", type=int, default=40)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    p.add_argument("--out", type=Path, help="write the rows as json here too")
    p.add_argument("--gap", nargs="+", type=Path, help="only print the generalization numbers of these metrics.jsonl")
    args = p.parse_args()
    if args.gap:
        for path in args.gap:
            print(path, json.dumps(gap_numbers(path)))
        return
    data = data_overrides(args.dataset, args.data_dir, args.num_train, args.num_val, args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            rows.append(run_variant(name, data, args.iters, args.threads, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                               indent=1))
    print(f"{args.dataset}, {args.num_train} training / {args.num_val} val images, {args.iters} iterations, "
          f"seed {args.seed}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
