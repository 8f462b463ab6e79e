"""Plot a run's metrics.jsonl: loss terms, lr, grad norm and the threshold counts, with alarms marked.

  python tools/plot_metrics.py OUTPUT_DIR [--out FILE.png]

Needs matplotlib (pip install "rcnn_trainer[plot]").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from rcnn_trainer.train.metrics_log import MetricsLog
from rcnn_trainer.losses.weighting import LOSS_NAMES, short_name


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist: pass a run folder written by rcnn-train")
    return MetricsLog(path).read()  # skips a last line cut by a killed run


def run_score_thresholds(run_dir: Path) -> list[float]:
    """monitor.score_thresholds of the run's resolved config.yaml (the default when it has none)."""
    from rcnn_trainer.config import MonitorConfig

    path = run_dir / "config.yaml"
    saved = yaml.safe_load(path.read_text()) if path.is_file() else None
    monitor = (saved or {}).get("monitor", {}) if isinstance(saved, dict) else {}
    return sorted(monitor.get("score_thresholds") or MonitorConfig().score_thresholds)


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    lines = read_metrics(run_dir)
    train = [l for l in lines if l.get("type") == "train"]
    monitor = [l for l in lines if l.get("type") == "monitor"]
    alarms = [l for l in lines if l.get("type") == "alarm"]
    score_thresholds = run_score_thresholds(run_dir)
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    it = [l["iter"] for l in train]

    ax = axes[0][0]
    ax.plot(it, [l["loss"] for l in train], color="black", label="total (weighted)")
    for name in LOSS_NAMES:
        ax.plot(it, [l.get(f"{name}_weighted", float("nan")) for l in train], label=short_name(name))
    evals = [l for l in lines if l.get("type") == "eval" and "val/loss" in l]
    if evals:  # the same weighted total on the val split, at each evaluation
        ax.plot([l["iter"] for l in evals], [l["val/loss"] for l in evals], "o--", color="black", label="val total")
    ax.set_yscale("log")
    ax.set_title("losses")
    ax.legend(fontsize=7)

    axes[0][1].plot(it, [l["lr"] for l in train])
    axes[0][1].set_title("learning rate")

    ax = axes[1][0]
    ax.plot(it, [l.get("grad_norm", float("nan")) for l in train])
    clipped = [l["iter"] for l in train if l.get("clipped")]
    if clipped:
        ax.plot(clipped, [l["grad_norm"] for l in train if l.get("clipped")], "r.", label="clipped")
        ax.legend(fontsize=7)
    ax.set_title("grad norm (before clipping)")
    ax.set_xlabel("iteration")

    ax = axes[1][1]
    for threshold in score_thresholds:
        key = f"dets@{threshold:g}"  # the column ThresholdCounts.as_record writes
        ax.plot([l["iter"] for l in monitor], [l.get(key, float("nan")) for l in monitor], marker="o", ms=3,
                label=f"score >= {threshold:g}")
    if monitor:
        ax.plot([l["iter"] for l in monitor], [l["gt_per_image"] for l in monitor], "k--", label="GT objects")
    ax.set_title("detections per probe image")
    ax.set_xlabel("iteration")
    ax.legend(fontsize=7)

    for alarm in alarms:
        for row in axes:
            for a in row:
                a.axvline(alarm["iter"], color="red", alpha=0.4, lw=1)
        axes[0][0].annotate(alarm["name"], (alarm["iter"], 1), xycoords=("data", "axes fraction"),
                            rotation=90, va="top", fontsize=7, color="red")
    fig.suptitle(f"{run_dir}  ({len(alarms)} alarms)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="PNG path (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        out = plot(args.run_dir, args.out or args.run_dir / "metrics.png")
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImportError:
        print('error: matplotlib is needed: pip install "rcnn_trainer[plot]"', file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
