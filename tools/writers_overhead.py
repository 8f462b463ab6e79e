"""What logging.writers cost a training iteration: config.yaml runs without and with both
writers (TensorBoard + MLflow to its local file store), alternated in one process, same seed.

Per run it reports the wall time of the training loop per iteration (forward, backward, step,
logging, monitor judgments: everything the writers could slow), the writers' thread CPU time per
iteration (what it takes from the two cores), and the items dropped. The final evaluation and
setup are outside the timed loop. Figures go to docs/writers.md.

  flock /tmp/heavy.lock python tools/writers_overhead.py --iters 60 --repeats 2 [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rcnn_trainer.config_loader import load_config
from rcnn_trainer.train.run_setup import build_run
from rcnn_trainer.train.trainer import finish, train_loop


def timed_run(config: str, overrides: list[str], out: Path, writers: list[str]) -> dict:
    cfg = load_config(config, [*overrides, f"output_dir={out}", f"logging.writers={writers}"])
    run = build_run(cfg, resume=False, log=lambda _msg: None, progress=False)
    started = time.perf_counter()
    train_loop(run)
    loop_s = time.perf_counter() - started
    hub = run.writers
    finish(run, time.time())  # the final evaluation, the checkpoints to MLflow, the writers closed
    iters = cfg.solver.max_iters
    return {"writers": ",".join(writers) or "none", "s_per_iter": loop_s / iters,
            "writer_cpu_ms_per_iter": 1000 * hub.busy_s / iters, "open_s": hub.open_s, "dropped": hub.dropped,
            "failed": dict(hub.failed)}


def record_cost(out: Path, count: int = 500) -> dict:
    """Per record, outside training: the training thread's hand-over (enqueue) and the writers'
    thread CPU time, for a train line of config.yaml's keys (44 numbers) to both writers."""
    import json

    from rcnn_trainer.writers import Writers
    from rcnn_trainer.writers.mlflow_writer import MLflowWriter
    from rcnn_trainer.writers.tensorboard_writer import TensorBoardWriter

    out.mkdir(parents=True)
    record = json.loads(TRAIN_LINE)
    hub = Writers([TensorBoardWriter(out / "tensorboard"), MLflowWriter(out, None, "overhead")], say=print)
    started = time.perf_counter()
    for i in range(count):
        hub.record({**record, "iter": i + 1})
    enqueue_s = (time.perf_counter() - started) / count
    hub.close()
    return {"enqueue_us": enqueue_s * 1e6, "thread_ms_per_record": 1000 * hub.busy_s / count, "dropped": hub.dropped,
            "failed": dict(hub.failed)}


# a train line of config.yaml's run (metrics.jsonl), its numbers rounded
TRAIN_LINE = (
    '{"type": "train", "iter": 20, "lr": 0.0004, "weight/loss_rpn_cls": 1.0, "weight/loss_rpn_box": 1.0, '
    '"weight/loss_roi_cls": 1.0, "weight/loss_roi_box": 1.0, "grad_norm": 3.1, "clipped": false, "loss": 1.9, '
    '"loss_rpn_cls": 0.6, "loss_rpn_box": 0.05, "loss_roi_cls": 1.1, "loss_roi_box": 0.15, "loss_rpn_cls_weighted": 0.6, '
    '"loss_rpn_box_weighted": 0.05, "loss_roi_cls_weighted": 1.1, "loss_roi_box_weighted": 0.15, '
    '"avg_factor/rpn_cls": 1024.0, "avg_factor/rpn_box": 40.0, "avg_factor/roi_cls": 512.0, "avg_factor/roi_box": 60.0, '
    '"rpn/pos_per_image": 5.0, "rpn/neg_per_image": 123.0, "roi/pos_per_image": 7.5, "roi/neg_per_image": 56.5, '
    '"roi/pos_proposal_iou": 0.6, "roi/pred_iou": 0.5, "rpn/pred_iou": 0.4, "roi/delta_std_ratio": 0.9, '
    '"roi/delta_corr": 0.3, "roi/fg_argmax_fraction": 0.2, "roi/box_loss_per_pos": 0.1, "rpn/box_loss_per_pos": 0.1, '
    '"gt_per_image": 3.0, "images": 8, "data_time": 0.01, "time": 0.4}')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2, help="Pairs of runs (without, with), alternated.")
    p.add_argument("--records-only", action="store_true", help="Only the per-record cost (no training runs).")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    overrides = [f"solver.max_iters={args.iters}", *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory(prefix="writers_overhead_") as tmp:
        cost = record_cost(Path(tmp) / "records")
        print(f"per record: hand-over {cost['enqueue_us']:.1f} us on the training thread; writers' thread "
              f"{cost['thread_ms_per_record']:.2f} ms CPU (TensorBoard + MLflow file store); dropped {cost['dropped']}; "
              f"failed {cost['failed']}", flush=True)
        if args.records_only:
            return 0
        for i in range(args.repeats):
            for writers in ([], ["tensorboard", "mlflow"]):
                row = timed_run(args.config, overrides, Path(tmp) / f"{i}_{len(writers)}", writers)
                rows.append(row)
                print(f"run {len(rows)}: writers {row['writers']:<18} {row['s_per_iter']:.4f} s/iter  writers' thread "
                      f"{row['writer_cpu_ms_per_iter']:.2f} ms CPU/iter (+{row['open_s']:.2f} s to open)  dropped {row['dropped']}  failed {row['failed']}",
                      flush=True)
    without = [r["s_per_iter"] for r in rows if r["writers"] == "none"]
    with_w = [r for r in rows if r["writers"] != "none"]
    ratio = statistics.median(r["s_per_iter"] for r in with_w) / statistics.median(without)
    thread = statistics.median(r["writer_cpu_ms_per_iter"] for r in with_w) / 1000 / statistics.median(without)
    print(f"with / without writers, median s/iter: {ratio:.4f} ({(ratio - 1) * 100:+.2f}%); the writers' thread "
          f"CPU per iteration: {thread * 100:.3f}% of an iteration; runs without writers spread "
          f"{(max(without) - min(without)) / statistics.median(without) * 100:.1f}% among themselves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
