"""TensorBoard: event files in <run folder>/tensorboard, through torch.utils.tensorboard.

Resume continues the same run: the new event file starts with `purge_step` = the checkpoint's
iteration + 1, and TensorBoard drops every older event at that step or later, so the steps a
killed process logged after its last checkpoint are not shown twice (metrics.jsonl drops them
the same way). A fresh start purges from step 0: a run that never reached a checkpoint starts over.
rcnn-eval into the run folder's eval/ adds its metrics and pictures without purging anything.
"""

from __future__ import annotations

from pathlib import Path

HPARAM_VALUE_CHARS = 1000  # a long list (anchor sizes) shown cut rather than refused


class TensorBoardWriter:
    name = "tensorboard"

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer = None

    def open(self, resume_step: int | None) -> None:
        """`resume_step`: the checkpoint's iteration (0: a fresh start), None: add to the run as it is (rcnn-eval)."""
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        self.log_dir.mkdir(parents=True, exist_ok=True)
        purge = None if resume_step is None else resume_step + 1 if resume_step else 0
        self._writer = SummaryWriter(str(self.log_dir), purge_step=purge, flush_secs=30)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        # markdown: indent by 4 so the fixed-width console block stays as printed
        self._writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def picture(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self._writer.add_image(tag, pixels, step, dataformats="HWC")

    def params(self, values: dict[str, str], final_metrics: dict[str, float]) -> None:
        """The resolved config as hparams, beside the final metrics (the HParams dashboard's table)."""
        from torch.utils.tensorboard.summary import hparams

        shown = {k: (v if isinstance(v, (int, float, bool)) else str(v)[:HPARAM_VALUE_CHARS]) for k, v in values.items()}
        for summary in hparams(shown, final_metrics):
            self._writer.file_writer.add_summary(summary)

    def artifact(self, path: Path, folder: str) -> None:
        """Files (checkpoints) are MLflow's: TensorBoard shows numbers, text and pictures."""

    def flush(self) -> None:
        self._writer.flush()

    def close(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()
