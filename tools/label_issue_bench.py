"""Label-issue finder on planted errors: corrupt a COCO file, run `rcnn-eval --analyze` with a
model trained on clean data, and score label_issues.json against what was planted.

  python tools/label_issue_bench.py plant --ann val.json --out bad_val.json --share 0.06 --seed 0
  python tools/label_issue_bench.py run --config RUN/config.yaml --checkpoint RUN/model_final.pth \
      --ann val.json --img-dir images --out /tmp/lib [--split val|train] [KEY=VALUE ...]
  python tools/label_issue_bench.py halves --ann bad_train.json --out-prefix /tmp/half   # A / B by image
  python tools/label_issue_bench.py score --issues A/label_issues.json B/label_issues.json --planted P.json

Planted, each on a disjoint random `share` of the annotations (non-crowd): `swapped` (the
category replaced by another of the file's), `deleted` (the annotation removed), `moved` (the box
shifted by half its width or height, kept inside the image; its segmentation dropped). Scored:
a report finds a planted swap or move when it names that annotation id (any kind), a deletion
when an `overlooked` report in that image has IoU >= 0.5 with the deleted box. Precision at N
(N = the number planted): the share of the top N reports that find a planted error not found
higher up; recall at 2N: the share of planted errors found in the top 2N.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path


def iou_xywh(a: list[float], b: list[float]) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w, h = max(0.0, min(ax1, bx1) - max(a[0], b[0])), max(0.0, min(ay1, by1) - max(a[1], b[1]))
    union = a[2] * a[3] + b[2] * b[3] - w * h
    return w * h / union if union > 0 else 0.0


def plant(data: dict, share: float, seed: int) -> tuple[dict, list[dict]]:
    rng = random.Random(seed)
    data = json.loads(json.dumps(data))
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    cats = [c["id"] for c in data["categories"]]
    candidates = [a for a in data["annotations"] if not a.get("iscrowd") and a.get("bbox")]
    rng.shuffle(candidates)
    count = max(1, round(share * len(candidates)))
    swapped, deleted, moved = candidates[:count], candidates[count:2 * count], candidates[2 * count:3 * count]
    planted = []
    for a in swapped:
        old = a["category_id"]
        a["category_id"] = rng.choice([c for c in cats if c != old])
        planted.append({"kind": "swapped", "image_id": a["image_id"], "annotation_id": a["id"], "was": old})
    for a in moved:
        x, y, w, h = a["bbox"]
        width, height = sizes[a["image_id"]]
        dx, dy = (rng.choice([-1, 1]) * w / 2, 0.0) if rng.random() < 0.5 else (0.0, rng.choice([-1, 1]) * h / 2)
        if not 0 <= x + dx <= width - w:
            dx = -dx
        if not 0 <= y + dy <= height - h:
            dy = -dy
        a["bbox"] = [min(max(0.0, x + dx), width - w), min(max(0.0, y + dy), height - h), w, h]
        a.pop("segmentation", None)
        planted.append({"kind": "moved", "image_id": a["image_id"], "annotation_id": a["id"], "was": [x, y, w, h]})
    gone = {a["id"] for a in deleted}
    planted += [{"kind": "deleted", "image_id": a["image_id"], "annotation_id": a["id"], "bbox": a["bbox"]}
                for a in deleted]
    data["annotations"] = [a for a in data["annotations"] if a["id"] not in gone]
    return data, planted


def finds(issue: dict, error: dict) -> bool:
    if error["kind"] == "deleted":
        return (issue["kind"] == "overlooked" and issue["image_id"] == error["image_id"]
                and iou_xywh(issue["bbox"], error["bbox"]) >= 0.5)
    return issue.get("annotation_id") == error["annotation_id"]


def score(issues: list[dict], planted: list[dict]) -> dict:
    n = len(planted)
    found_at: dict[int, int] = {}  # planted index -> rank of the first report that finds it
    for rank, issue in enumerate(issues[:2 * n]):
        for k, error in enumerate(planted):
            if k not in found_at and finds(issue, error):
                found_at[k] = rank
                break
    top_n = sum(1 for rank in found_at.values() if rank < n)
    by_kind = {kind: {"planted": sum(1 for e in planted if e["kind"] == kind),
                      "found_in_2N": sum(1 for k, e in enumerate(planted) if e["kind"] == kind and k in found_at)}
               for kind in ("swapped", "deleted", "moved")}
    return {"planted": n, "reported": len(issues), "precision_at_N": top_n / n if n else 0.0,
            "recall_at_2N": len(found_at) / n if n else 0.0, "by_kind": by_kind,
            "reported_kinds_top_N": {k: sum(1 for i in issues[:n] if i["kind"] == k)
                                     for k in ("overlooked", "swapped", "badly_located", "spurious")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("plant")
    a.add_argument("--ann", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--share", type=float, default=0.06)
    a.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--config", required=True)
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--ann", type=Path, help="the clean file to plant into (omit with --planted)")
    r.add_argument("--planted", type=Path, help="score an existing corrupted file: its planted.json")
    r.add_argument("--img-dir", required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--split", choices=["val", "train"], default="val")
    r.add_argument("--share", type=float, default=0.06)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("overrides", nargs="*")
    h = sub.add_parser("halves", help="split a COCO file into two halves by image (k-fold with k = 2)")
    h.add_argument("--ann", type=Path, required=True)
    h.add_argument("--out-prefix", required=True)
    h.add_argument("--seed", type=int, default=0)
    sc = sub.add_parser("score", help="score the merged label_issues of several runs against one planted list")
    sc.add_argument("--issues", type=Path, nargs="+", required=True)
    sc.add_argument("--planted", type=Path, required=True)
    args = p.parse_args()
    if args.command == "halves":
        data = json.loads(args.ann.read_text())
        ids = sorted(im["id"] for im in data["images"])
        random.Random(args.seed).shuffle(ids)
        for name, part in (("A", set(ids[::2])), ("B", set(ids[1::2]))):
            half = {**data, "images": [im for im in data["images"] if im["id"] in part],
                    "annotations": [a for a in data["annotations"] if a["image_id"] in part]}
            Path(f"{args.out_prefix}{name}.json").write_text(json.dumps(half))
        print(f"wrote {args.out_prefix}A.json and {args.out_prefix}B.json")
        return
    if args.command == "score":
        issues = sorted((i for f in args.issues for i in json.loads(f.read_text())), key=lambda i: -i["score"])
        print(json.dumps(score(issues, json.loads(args.planted.read_text())), indent=1))
        return
    if args.command == "plant":
        data, planted = plant(json.loads(args.ann.read_text()), args.share, args.seed)
        args.out.write_text(json.dumps(data))
        args.out.with_suffix(".planted.json").write_text(json.dumps(planted, indent=1))
        print(f"planted {len(planted)} errors into {args.out} ({args.out.with_suffix('.planted.json')})")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.planted:
        planted = json.loads(args.planted.read_text())
        corrupted = args.planted.with_name(args.planted.name.replace(".planted.json", ".json"))
    else:
        data, planted = plant(json.loads(args.ann.read_text()), args.share, args.seed)
        corrupted = args.out / "corrupted.json"
        corrupted.write_text(json.dumps(data))
        (args.out / "corrupted.planted.json").write_text(json.dumps(planted, indent=1))
    split = args.split
    cmd = [sys.executable, "-m", "rcnn_trainer.cli", "eval", "--config", args.config, "--checkpoint", args.checkpoint,
           "--analyze", "--split", split, "--no-progress", "--output-dir", str(args.out / "eval"),
           f"data.{split}={{ann_file: '{corrupted}', img_dir: '{args.img_dir}'}}", *args.overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print("\n".join(l for l in proc.stdout.splitlines() if l.startswith(("[analyze]", "[eval]"))))
    if proc.returncode != 0:
        sys.exit(f"rcnn-eval failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = score(json.loads((args.out / "eval" / "label_issues.json").read_text()), planted)
    result.update(share=args.share, seed=args.seed, split=split, checkpoint=args.checkpoint)
    (args.out / "score.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
