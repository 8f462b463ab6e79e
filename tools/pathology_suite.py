"""Pathology suite: for each alarm, a run that should raise it, plus healthy runs that must not.

  python tools/pathology_suite.py --iters 300 --out pathology.json [--only NAME ...]
  (each run's metrics.jsonl is kept under pathology_runs/)

Every scenario is the real `rcnn-train` on a recipe and a dataset with the overrides that
provoke one failure. The table says, per scenario, the alarm expected, the iteration it first
fired (and whether that is within the first third of the run), and every other alarm raised.
Healthy scenarios pass when they raise nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
import recipe_bench  # noqa: E402  (tools/ is not a package)

from rcnn_trainer.data.synthetic import ensure_synthetic_dataset  # noqa: E402

DEFAULT_RECIPE = "config.yaml"
MANY_CLASSES_RECIPE = "configs/many_classes.yaml"  # what the preflight points to at 10+ classes


@dataclass(frozen=True)
class Scenario:
    expected: str | None  # the alarm it should raise; None: a healthy run that must raise nothing
    overrides: list[str] = field(default_factory=list)
    # "config": the recipe's own data (config.yaml: the built-in synthetic shapes);
    # "digits", "glyphs", "digits_large", "glyphs_large": tools/bench_datasets.py at its size, batch 4;
    # "shuffled_labels": config.yaml's synthetic images with every training label drawn at random
    dataset: str = "config"
    recipe: str = DEFAULT_RECIPE
    key: str | None = None  # the config key that causes it: the first alarm's first advice should name it


SCENARIOS = {
    "healthy": Scenario(None),
    # real content that the recipes learn within 300 iterations: TrueType letters with config.yaml;
    # handwriting scans with the wider head (config.yaml's 64-channel FPN and 256-wide head learn
    # them too slowly: class_confusion 135-210, AP 0.204)
    "healthy@glyphs_large": Scenario(None, dataset="glyphs_large"),
    "healthy@digits_large": Scenario(None, dataset="digits_large", recipe=MANY_CLASSES_RECIPE),
    "old_default_head@digits": Scenario("class_confusion", ["model.backbone.fpn_channels=64",
                                                            "model.roi.representation_size=256",
                                                            "model.roi.batch_size_per_image=64"], dataset="digits"),
    "background_wins": Scenario("low_confidence", ["model.rpn.positive_fraction=0.02", "model.roi.positive_fraction=0.01",
                                                   "model.roi.batch_size_per_image=256"], key="model.roi.cls_pos_weight"),
    # foreground is learnable (boxes are right) but the classes carry no signal
    "shuffled_labels": Scenario("class_confusion", dataset="shuffled_labels", key="data.train.ann_file"),
    "regressor_without_signal": Scenario("regressor_collapse", ["model.roi.box_loss.weight=0.0"]),
    "collapse": Scenario("collapse", ["model.rpn.cls_pos_weight=0.01", "model.rpn.positive_fraction=0.02",
                                      "model.roi.cls_pos_weight=0.01", "model.roi.positive_fraction=0.02"]),
    "box_weight_50x": Scenario("dominant_loss", ["model.roi.box_loss.weight=50.0"], key="model.roi.box_loss.weight"),
    "lr_far_too_low": Scenario("vanishing_lr", ["solver.lr=1e-8"], key="solver.lr"),
    # 500x config.yaml's lr, no clipping (config.yaml has none): diverges in warmup
    "lr_far_too_high_adamw": Scenario("divergence", ["solver.lr=0.5"], key="solver.lr"),
    "lr_far_too_high_sgd": Scenario("lr_too_high_for_batch", ["solver.optimizer=sgd", "solver.lr=0.5"], key="solver.lr"),
    # too high only once a short warmup has ramped it up (lr 0.5 diverged in warmup at lr 0.045)
    "lr_too_high_after_warmup": Scenario("divergence", ["solver.lr=0.06", "solver.warmup_iters=20"], key="solver.lr"),
    # high enough to kill the model without a loss blow-up: a grad spike in warmup, then the
    # loss falls to the background-only level while the grad norm fades 53 -> 0.1 (seen 2026-12-07)
    "lr_kills_the_model": Scenario("gradients", ["solver.lr=0.03", "solver.warmup_iters=60"], key="solver.lr"),
    # the issue-39 healthy digits run (config.yaml given the data) that raised class_confusion while climbing
    "healthy@digits": Scenario(None, dataset="digits"),
    "anchors_far_too_large": Scenario("anchor_coverage", ["model.anchors.sizes=[[128],[256],[512],[1024],[2048]]"],
                                      key="model.anchors.sizes"),
    "clip_every_step": Scenario("gradients", ["solver.clip_grad_norm=0.0001"]),
    # instance masks (model.mask.enabled): healthy on three datasets, and a mask head without signal
    "healthy_masks": Scenario(None, ["model.mask.enabled=true"]),
    "healthy_masks@glyphs_large": Scenario(None, ["model.mask.enabled=true"], dataset="glyphs_large"),
    "healthy_masks@digits_large": Scenario(None, ["model.mask.enabled=true"], dataset="digits_large",
                                           recipe=MANY_CLASSES_RECIPE),
    "mask_without_signal": Scenario("mask_not_learning", ["model.mask.enabled=true", "model.mask.loss.weight=0.0"]),
    # 8 training images and a constant lr: the model memorizes them (needs --eval-period)
    "tiny_training_set": Scenario("overfitting", ["data.synthetic={num_train: 8, num_val: 60, image_size: 128, seed: 0}",
                                                  "data.hflip_prob=0", "solver.schedule=constant"]),
}


def shuffled_labels_dataset(data_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """config.yaml's synthetic data with each training object's category drawn uniformly at
    random (val keeps the true labels): boxes stay learnable, classes do not."""
    source = ensure_synthetic_dataset(num_train=300, num_val=60, image_size=128, seed=0)
    out = data_dir / "shuffled_labels"
    out.mkdir(parents=True, exist_ok=True)
    train = json.loads((source / "train.json").read_text())
    ids = [c["id"] for c in train["categories"]]
    rng = np.random.default_rng(seed)
    for annotation in train["annotations"]:
        annotation["category_id"] = int(rng.choice(ids))
    (out / "train.json").write_text(json.dumps(train))
    (out / "val.json").write_text((source / "val.json").read_text())
    return out, source / "images"


def data_overrides(scenario: Scenario, iters: int, data_dir: Path) -> list[str]:
    if scenario.dataset == "config":
        return []
    if scenario.dataset == "shuffled_labels":
        folder, images = shuffled_labels_dataset(data_dir)
        return [f"data.train={{ann_file: '{folder / 'train.json'}', img_dir: '{images}'}}",
                f"data.val={{ann_file: '{folder / 'val.json'}', img_dir: '{images}'}}"]
    data = recipe_bench.data_overrides(scenario.dataset, data_dir, batch=4, iters=iters, seed=42)
    return [o for o in data if not o.startswith("solver.max_iters")]


def run(name: str, scenario: Scenario, iters: int, threads: int, data_dir: Path, keep: Path,
        eval_period: int = 0) -> dict:
    """One scenario; its metrics.jsonl is kept as keep/<name>.metrics.jsonl (the probe series
    behind every alarm, for a look after the run)."""
    overrides = data_overrides(scenario, iters, data_dir) + scenario.overrides
    kept = keep / f"{name}.metrics.jsonl"
    kept.unlink(missing_ok=True)  # never read an earlier run's series as this one's
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / name.replace("@", "_")
        recipe = REPO / scenario.recipe  # the recipes of this checkout, wherever the suite is run from
        cmd = [sys.executable, "-m", "rcnn_trainer.cli", "train", "--config", str(recipe), "--output-dir",
               str(out), "--no-progress", f"solver.max_iters={iters}", f"train.threads={threads}",
               f"train.eval_period={eval_period}", *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if (out / "metrics.jsonl").is_file():
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / "metrics.jsonl", kept)
    lines = [json.loads(l) for l in kept.read_text().splitlines() if l.strip()] if kept.is_file() else []
    alarms = [(l["name"], l["iter"]) for l in lines if l["type"] in ("alarm", "preflight")]
    first = next((l for l in lines if l["type"] in ("alarm", "preflight")), None)
    first_key = first["change"][0].split(":")[0] if first and first.get("change") else None
    final = [l for l in lines if l["type"] == "summary"]
    return {"exit": proc.returncode, "alarms": alarms, "AP": final[-1]["AP"] if final else None,
            "first_alarm": first["name"] if first else None, "first_key": first_key,
            "pos_weight_advised": any("cls_pos_weight" in c for l in lines if l["type"] == "alarm"
                                      for c in l.get("change", [])),
            "stderr": proc.stderr[-500:] if proc.returncode not in (0, 1) else ""}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="+", choices=list(SCENARIOS))
    p.add_argument("--eval-period", type=int, default=0, help="evaluations during training (the overfitting check "
                   "reads them; 0 = only at the end)")
    p.add_argument("--out", type=Path, default=Path("pathology.json"))
    p.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    args = p.parse_args()
    rows = []
    print("| scenario | recipe | expected alarm | first fired at iter (of N) | in first third | first alarm: first key "
          "| right key | other alarms | AP |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.only or SCENARIOS:
        scenario = SCENARIOS[name]
        result = run(name, scenario, args.iters, args.threads, args.data_dir,
                     keep=args.out.with_name(args.out.stem + "_runs"), eval_period=args.eval_period)
        fired = [it for alarm, it in result["alarms"] if alarm == scenario.expected]
        first = min(fired) if fired else None
        others = sorted({f"{a}@{it}" for a, it in result["alarms"] if a != scenario.expected},
                        key=lambda s: int(s.split("@")[1]))
        ran = result["exit"] in (0, 1)  # 1: a run the monitor stopped; 2 or a crash is no result at all
        right_key = scenario.key is None or result["first_key"] == scenario.key
        ok = ran and right_key and ((first is not None and first <= args.iters / 3) if scenario.expected
                                    else not result["alarms"])
        rows.append({"scenario": name, "recipe": scenario.recipe, "expected": scenario.expected, "first_iter": first,
                     "ok": ok, **result})
        ap = f"{result['AP']:.3f}" if result["AP"] is not None else f"exit {result['exit']}"
        print(f"| {name} | {scenario.recipe} | {scenario.expected or 'none (healthy)'} | "
              f"{first if first is not None else '-'} (of {args.iters}) | {'yes' if ok else 'NO'} | "
              f"{result['first_alarm'] or '-'}: {result['first_key'] or '-'} | "
              f"{'-' if scenario.key is None else ('yes' if right_key else 'NO')} | "
              f"{', '.join(others[:6]) or '-'} | {ap} |", flush=True)
        if not ran:
            print(f"  {name} did not run (exit {result['exit']}): {result['stderr'].strip().splitlines()[-1:]}")
        args.out.write_text(json.dumps({"iters": args.iters, "rows": rows}, indent=1))
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} scenarios as expected; wrote {args.out}")


if __name__ == "__main__":
    main()
