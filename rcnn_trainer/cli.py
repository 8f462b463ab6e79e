"""Command line: rcnn-train and rcnn-eval (also `python -m rcnn_trainer.cli train|eval ...`).

Exit codes: 0 success; 2 bad config, data or arguments (one paragraph, no traceback);
1 anything else (training stopped on purpose prints its reason; bugs print a traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rcnn_trainer.errors import TrainingStopped, UserError


class _ArgParser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 already; keep its message on one line
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _train_parser() -> argparse.ArgumentParser:
    p = _ArgParser(prog="rcnn-train", description="Train a two-stage detector from a YAML config.")
    p.add_argument("--config", required=True, help="YAML config (see config.yaml and configs/).")
    p.add_argument("--output-dir", help="Run folder (overrides output_dir).")
    p.add_argument("--resume", action="store_true", help="Continue from the newest checkpoint in the run folder.")
    p.add_argument("--preflight", action="store_true", help="Only load and check the data, then exit.")
    p.add_argument("--lr-find", action="store_true", help="Run an LR range test, suggest solver.lr, and exit.")
    p.add_argument("--lr-find-iters", type=int, default=100, help="Steps of the LR range test.")
    p.add_argument("--lr-find-range", type=float, nargs=2, default=[1e-6, 1.0], metavar=("MIN", "MAX"),
                   help="lr range of the sweep.")
    p.add_argument("--no-progress", action="store_true", help="No progress bars (log lines only).")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Dotted overrides, e.g. solver.max_iters=200.")
    return p


def _eval_parser() -> argparse.ArgumentParser:
    p = _ArgParser(prog="rcnn-eval", description="COCO-evaluate a checkpoint on the val split.")
    p.add_argument("--config", required=True, help="YAML config the checkpoint was trained with.")
    p.add_argument("--checkpoint", required=True, help="Checkpoint file (e.g. output/default/model_final.pth).")
    p.add_argument("--output-dir", help="Where results go (default: <output_dir>/eval).")
    p.add_argument("--visualize", type=int, default=0, metavar="N", help="Draw N images with GT and predictions.")
    p.add_argument("--no-progress", action="store_true", help="No progress bars.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Dotted overrides.")
    return p


def _load(args, output_dir: str | None = None):
    from rcnn_trainer.config_loader import load_config

    extra = [f"output_dir={output_dir}"] if output_dir else []
    return load_config(args.config, [*args.overrides, *extra])


def _run_train(argv) -> int:
    args = _train_parser().parse_intermixed_args(argv)
    cfg = _load(args, output_dir=args.output_dir)
    if args.preflight:
        from rcnn_trainer.data.loader import build_dataset
        from rcnn_trainer.data.summary import format_summary, summarize_dataset
        from rcnn_trainer.monitor.preflight import preflight_from_config, raise_on_errors

        reports = []
        for split in ("train", "val"):
            dataset = build_dataset(cfg, split)
            print(format_summary(summarize_dataset(dataset, split), dataset))
            reports.append(preflight_from_config(cfg, dataset, split))
            print(reports[-1].format())
        for report in reports:
            raise_on_errors(report)
        print("[preflight] no errors.")
        return 0
    if args.lr_find:
        from rcnn_trainer.engine.lr_finder import run_lr_find

        low, high = args.lr_find_range
        if not 0 < low < high or args.lr_find_iters < 3:
            raise UserError("--lr-find-range needs 0 < MIN < MAX and --lr-find-iters at least 3.")
        run_lr_find(cfg, min_lr=low, max_lr=high, iters=args.lr_find_iters, progress=not args.no_progress)
        return 0
    from rcnn_trainer.engine.trainer import train

    train(cfg, resume=args.resume, progress=not args.no_progress)
    return 0


def _run_eval(argv) -> int:
    args = _eval_parser().parse_intermixed_args(argv)
    if args.visualize < 0:
        raise UserError(f"--visualize takes a number of images >= 0, got {args.visualize}.")
    cfg = _load(args)
    from rcnn_trainer.engine.run_eval import run_evaluation

    out = Path(args.output_dir) if args.output_dir else Path(cfg.output_dir) / "eval"
    run_evaluation(cfg, Path(args.checkpoint), out, visualize=args.visualize, progress=not args.no_progress)
    return 0


def _without_worker_traceback(message: str) -> str:
    """A UserError raised in a DataLoader worker comes back wrapped with the worker's traceback
    ("Caught UserError in DataLoader worker process 0. Original Traceback ..."): keep our message."""
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _guard(run, argv) -> int:
    try:
        return run(argv)
    except UserError as err:
        print(f"error: {_without_worker_traceback(str(err))}", file=sys.stderr)
        return err.exit_code
    except TrainingStopped as err:
        print(f"stopped: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted; the newest checkpoint is intact (continue with --resume).", file=sys.stderr)
        return 130


def train_main(argv=None) -> int:
    return _guard(_run_train, sys.argv[1:] if argv is None else argv)


def eval_main(argv=None) -> int:
    return _guard(_run_eval, sys.argv[1:] if argv is None else argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_main, "eval": eval_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m rcnn_trainer.cli {train,eval} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
