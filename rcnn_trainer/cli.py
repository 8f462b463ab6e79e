"""Command line: rcnn-train, rcnn-eval, rcnn-predict, rcnn-export and rcnn-convert (also
`python -m rcnn_trainer.cli train|eval|predict|export|convert ...`).
KEY=VALUE overrides may stand anywhere among the options.

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
    p.add_argument("--overwrite", action="store_true", help="Replace eval outputs in a folder rcnn_trainer did not create.")
    p.add_argument("--visualize", type=int, default=0, metavar="N", help="Draw N images with GT and predictions.")
    p.add_argument("--tta", action="store_true", help="Test-time augmentation: the sizes and flips of tta.*, merged by NMS.")
    p.add_argument("--analyze", action="store_true", help="Also write the confusion matrix, PR curves, the AP error "
                   "breakdown and label_issues.json into the eval folder.")
    p.add_argument("--analyze-score", type=float, default=0.3, help="Detections at or above this score count for "
                   "--analyze's confusion matrix and label issues.")
    p.add_argument("--split", choices=["val", "train"], default="val", help="The split to evaluate (train: look for "
                   "label issues in the training file; the output says how that biases them).")
    p.add_argument("--no-progress", action="store_true", help="No progress bars.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Dotted overrides.")
    return p


def _predict_parser() -> argparse.ArgumentParser:
    p = _ArgParser(prog="rcnn-predict", description="Run a trained checkpoint on images, folders or globs.")
    p.add_argument("--config", required=True, help="YAML config the checkpoint was trained with.")
    p.add_argument("--checkpoint", required=True, help="Checkpoint file (e.g. output/default/model_final.pth).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="Image files, folders of images, or glob patterns.")
    p.add_argument("--output-dir", default="predictions",
                   help="Where predictions.json, predictions.jsonl, summary.json and vis/ go.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace the predictions an earlier run left in --output-dir (refused otherwise).")
    p.add_argument("--score-thresh", type=float, default=0.5, help="Keep detections with at least this score.")
    p.add_argument("--no-draw", action="store_true", help="Only the json, no drawn images.")
    p.add_argument("--tta", action="store_true", help="Test-time augmentation: the sizes and flips of tta.*, merged by NMS.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Config override (repeatable), e.g. --set train.device=cpu.")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = _ArgParser(prog="rcnn-export", description="Export a checkpoint as one ONNX or TorchScript file "
                   "(resize and normalization inside; input float32 [1, 3, H, W] RGB in [0, 1]).")
    p.add_argument("--config", required=True, help="YAML config the checkpoint was trained with.")
    p.add_argument("--checkpoint", required=True, help="Checkpoint file (e.g. output/default/model_final.pth).")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="onnx (opset 17) or torchscript.")
    p.add_argument("--output", required=True, help="The file to write; FILE.labels.json is written beside it.")
    p.add_argument("--overwrite", action="store_true", help="Replace FILE and FILE.labels.json if they exist.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Dotted overrides.")
    return p


def _convert_parser() -> argparse.ArgumentParser:
    p = _ArgParser(prog="rcnn-convert", description="Write the COCO json of a VOC, YOLO or LabelMe split "
                   "(docs/formats.md): from a config's data.<split>, or from --ann-file/--img-dir.")
    p.add_argument("--to", required=True, choices=["coco"], help="The format to write (coco).")
    p.add_argument("--output", "--out", required=True, help="The json file to write.")
    p.add_argument("--config", help="Read data.<split> (and data.bad_records) of this config.")
    p.add_argument("--split", choices=["train", "val"], default="train", help="The split to convert.")
    p.add_argument("--ann-file", help="The labels, instead of --config: a VOC folder, .xml or id list, a YOLO yaml "
                   "or labels folder, a LabelMe folder.")
    p.add_argument("--img-dir", help="The images folder (with --ann-file; a YOLO yaml finds its own).")
    p.add_argument("--format", default="auto", choices=["auto", "voc", "yolo", "labelme"], help="With --ann-file.")
    p.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Dotted overrides (with --config).")
    return p


def _load(args, output_dir: str | None = None):
    from rcnn_trainer.config_loader import load_config

    extra = [f"output_dir={output_dir}"] if output_dir else []
    return load_config(args.config, [*args.overrides, *extra], log=print)


def _run_train(argv) -> int:
    args = _train_parser().parse_intermixed_args(argv)
    cfg = _load(args, output_dir=args.output_dir)
    if args.preflight:
        from rcnn_trainer.data.summary import format_summary, summarize_dataset
        from rcnn_trainer.data.settings import prepare_datasets
        from rcnn_trainer.monitor.preflight import preflight_from_config, raise_on_errors

        cfg, train_set, val_set = prepare_datasets(cfg, print)
        reports = []
        for split, dataset in (("train", train_set), ("val", val_set)):
            print(format_summary(summarize_dataset(dataset, split), dataset))
            reports.append(preflight_from_config(cfg, dataset, split))
            print(reports[-1].format())
        for report in reports:
            raise_on_errors(report)
        print("[preflight] no errors.")
        return 0
    if args.lr_find:
        from rcnn_trainer.train.lr_finder import run_lr_find

        low, high = args.lr_find_range
        if not 0 < low < high or args.lr_find_iters < 3:
            raise UserError("--lr-find-range needs 0 < MIN < MAX and --lr-find-iters at least 3.")
        run_lr_find(cfg, min_lr=low, max_lr=high, iters=args.lr_find_iters, progress=not args.no_progress)
        return 0
    from rcnn_trainer.train.trainer import train

    train(cfg, resume=args.resume, progress=not args.no_progress)
    return 0


def _run_eval(argv) -> int:
    args = _eval_parser().parse_intermixed_args(argv)
    if args.visualize < 0:
        raise UserError(f"--visualize takes a number of images >= 0, got {args.visualize}.")
    cfg = _load(args)
    from rcnn_trainer.infer.run_eval import run_evaluation

    out = Path(args.output_dir) if args.output_dir else Path(cfg.output_dir) / "eval"
    if not 0.0 <= args.analyze_score <= 1.0:
        raise UserError(f"--analyze-score takes a score in [0, 1], got {args.analyze_score}.")
    run_evaluation(cfg, Path(args.checkpoint), out, visualize=args.visualize, progress=not args.no_progress,
                   tta=args.tta, analyze=args.analyze, analyze_score=args.analyze_score, split=args.split,
                   overwrite=args.overwrite)
    return 0


def _run_predict(argv) -> int:
    parser = _predict_parser()
    args = parser.parse_intermixed_args(argv)
    # KEY=VALUE words among the inputs are overrides too (as for the other commands)
    args.overrides += [i for i in args.inputs if "=" in i and not Path(i).exists()]
    args.inputs = [i for i in args.inputs if i not in args.overrides]
    if not args.inputs:
        parser.error("give at least one image, folder or glob")
    if not 0.0 <= args.score_thresh <= 1.0:
        raise UserError(f"--score-thresh takes a score in [0, 1], got {args.score_thresh}.")
    cfg = _load(args)
    from rcnn_trainer.infer.predict import run_prediction

    run_prediction(cfg, Path(args.checkpoint), args.inputs, Path(args.output_dir), score_thresh=args.score_thresh,
                   draw=not args.no_draw, progress=not args.no_progress, tta=args.tta, overwrite=args.overwrite)
    return 0


def _run_export(argv) -> int:
    args = _export_parser().parse_intermixed_args(argv)
    cfg = _load(args)
    from rcnn_trainer.infer.export import export_model

    result = export_model(cfg, Path(args.checkpoint), args.format, Path(args.output), overwrite=args.overwrite)
    return 0 if result.get("matches", True) else 1


def _run_convert(argv) -> int:
    args = _convert_parser().parse_intermixed_args(argv)
    from rcnn_trainer.data.labels.convert import convert_to_coco

    if (args.config is None) == (args.ann_file is None):
        raise UserError("rcnn-convert takes either --config (and --split) or --ann-file (and --img-dir).")
    if args.ann_file is not None:
        img_dir = Path(args.img_dir) if args.img_dir else None
        convert_to_coco(Path(args.ann_file), img_dir, args.format, args.split, Path(args.output),
                        overwrite=args.overwrite)
        return 0
    cfg = _load(args)
    source = getattr(cfg.data, args.split)
    if source is None:
        raise UserError(f"{args.config}: data.{args.split} is not set (the synthetic dataset is COCO already).")
    bad = cfg.data.bad_records
    from rcnn_trainer.data.records import RecordPolicy

    policy = RecordPolicy(**{kind: getattr(bad, kind) for kind in RecordPolicy.__dataclass_fields__})
    convert_to_coco(source.ann_file, source.img_dir, source.format, args.split, Path(args.output),
                    overwrite=args.overwrite, policy=policy)
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


def predict_main(argv=None) -> int:
    return _guard(_run_predict, sys.argv[1:] if argv is None else argv)


def export_main(argv=None) -> int:
    return _guard(_run_export, sys.argv[1:] if argv is None else argv)


def convert_main(argv=None) -> int:
    return _guard(_run_convert, sys.argv[1:] if argv is None else argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": train_main, "eval": eval_main, "predict": predict_main, "export": export_main,
                "convert": convert_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m rcnn_trainer.cli {train,eval,predict,export,convert} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
