"""Pathology suite: for each alarm, a run that should raise it, plus healthy runs that must not.

  python tools/pathology_suite.py --iters 300 --out pathology.json [--only NAME ...]

Every scenario is the real `rcnn-train` on a recipe (config.yaml by default, the built-in
synthetic data) with the overrides that provoke one failure. The table says, per scenario, the
alarm expected, the iteration it first fired (and whether that is within the first third of the
run), and every other alarm raised. Healthy scenarios pass when they raise nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_bench  # noqa: E402  (tools/ is not a package)

# name -> (expected alarm or None for healthy, overrides); names ending in @digits / @glyphs run
# on that dataset of tools/bench_datasets.py (at its size, batch 4), the others on config.yaml's
# synthetic data. The healthy runs on 10+ classes use the recipe the preflight points to there.
MANY_CLASSES_RECIPE = "configs/many_classes.yaml"
RECIPES = {"healthy@glyphs": MANY_CLASSES_RECIPE, "healthy@digits": MANY_CLASSES_RECIPE}
SCENARIOS = {
    "healthy": (None, []),
    "healthy@glyphs": (None, []),
    "healthy@digits": (None, []),
    "old_default_head@digits": ("class_confusion", ["model.backbone.fpn_channels=64", "model.roi.representation_size=256"]),
    "background_wins": ("low_confidence", ["model.rpn.positive_fraction=0.02", "model.roi.positive_fraction=0.01",
                                           "model.roi.batch_size_per_image=256"]),
    "class_confusion": ("class_confusion", ["model.roi.representation_size=8", "model.backbone.fpn_channels=8"]),
    "regressor_without_signal": ("regressor_collapse", ["model.roi.box_loss.weight=0.0"]),
    "collapse": ("collapse", ["model.rpn.cls_pos_weight=0.01", "model.rpn.positive_fraction=0.02",
                              "model.roi.cls_pos_weight=0.01", "model.roi.positive_fraction=0.02"]),
    "box_weight_50x": ("dominant_loss", ["model.roi.box_loss.weight=50.0"]),
    "lr_far_too_low": ("vanishing_lr", ["solver.lr=1e-8"]),
    "anchors_far_too_large": ("anchor_coverage", ["model.anchors.sizes=[[128],[256],[512],[1024],[2048]]"]),
    "clip_every_step": ("gradients", ["solver.clip_grad_norm=0.0001"]),
}


def run(recipe: str, name: str, overrides: list[str], iters: int, threads: int, data_dir: Path) -> dict:
    if "@" in name:
        data = recipe_bench.data_overrides(name.split("@")[1], data_dir, batch=4, iters=iters, seed=42)
        overrides = [o for o in data if not o.startswith("solver.max_iters")] + overrides
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / name.replace("@", "_")
        cmd = [sys.executable, "-m", "rcnn_trainer.cli", "train", "--config", recipe, "--output-dir", str(out),
               "--no-progress", f"solver.max_iters={iters}", f"train.threads={threads}", *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()] \
            if (out / "metrics.jsonl").is_file() else []
    alarms = [(l["name"], l["iter"]) for l in lines if l["type"] in ("alarm", "preflight")]
    final = [l for l in lines if l["type"] == "summary"]
    return {"exit": proc.returncode, "alarms": alarms, "AP": final[-1]["AP"] if final else None,
            "stderr": proc.stderr[-500:] if proc.returncode not in (0, 1) else ""}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="config.yaml")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="+", choices=list(SCENARIOS))
    p.add_argument("--out", type=Path, default=Path("pathology.json"))
    p.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    args = p.parse_args()
    rows = []
    print("| scenario | recipe | expected alarm | first fired at iter (of N) | in first third | other alarms | AP |")
    print("|---|---|---|---|---|---|---|")
    for name in args.only or SCENARIOS:
        expected, overrides = SCENARIOS[name]
        result = run(RECIPES.get(name, args.recipe), name, overrides, args.iters, args.threads, args.data_dir)
        fired = [it for alarm, it in result["alarms"] if alarm == expected]
        first = min(fired) if fired else None
        others = sorted({f"{a}@{it}" for a, it in result["alarms"] if a != expected},
                        key=lambda s: int(s.split("@")[1]))
        ok = (first is not None and first <= args.iters / 3) if expected else not result["alarms"]
        rows.append({"scenario": name, "expected": expected, "first_iter": first, "ok": ok, **result})
        ap = f"{result['AP']:.3f}" if result["AP"] is not None else f"exit {result['exit']}"
        print(f"| {name} | {RECIPES.get(name, args.recipe)} | {expected or 'none (healthy)'} | {first if first is not None else '-'} (of {args.iters}) | "
              f"{'yes' if ok else 'NO'} | {', '.join(others[:6]) or '-'} | {ap} |", flush=True)
        args.out.write_text(json.dumps({"iters": args.iters, "recipe": args.recipe, "rows": rows}, indent=1))
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} scenarios as expected; wrote {args.out}")


if __name__ == "__main__":
    main()
