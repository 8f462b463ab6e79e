"""The README and docs quote what the current code prints: a drifted format fails here."""

from __future__ import annotations

import math
import re
from pathlib import Path

from rcnn_trainer.config import MonitorConfig
from rcnn_trainer.config_monitor import Limits
from rcnn_trainer.model import stats as S
from rcnn_trainer.monitor import checks
from rcnn_trainer.monitor.dashboard import format_dashboard
from rcnn_trainer.monitor.period import PeriodMeans
from rcnn_trainer.monitor.probe import ClassDiagnosis, ProbeResult
from rcnn_trainer.monitor.threshold_counts import ThresholdCounts

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]\d+)?"


def code_blocks(text: str) -> list[list[str]]:
    return [block.strip("\n").splitlines() for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)]


def as_pattern(line: str) -> re.Pattern:
    """A printed line with every number free: the format, not the figures."""
    parts = re.split(NUMBER, line)
    return re.compile(NUMBER.join(re.escape(p) for p in parts) + r"$")


def test_readme_is_a_short_guide_without_commit_hashes():
    assert len(README.splitlines()) <= 300
    hashes = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", README) if re.search(r"[a-f]", w) and re.search(r"\d", w)]
    assert hashes == []


def test_quoted_alarm_is_what_the_check_prints_now():
    block = next(b for b in code_blocks(README) if b[0].startswith("ALARM ["))
    assert block[0] == "ALARM [low_confidence]"
    probes = [ProbeResult(ThresholdCounts((0.05, 0.3, 0.5, 0.7), (d, 0.0, 0.0, 0.0), 3.38),
                          ClassDiagnosis(fg_mass=m, correct=math.nan, accuracy=math.nan, margin=math.nan,
                                         spread=math.nan)) for d, m in ((0.38, 0.03), (8.88, 0.04), (0.0, 0.01))]
    printed = checks.check_low_confidence(probes, sustain=3).format().splitlines()
    assert block == printed  # every line, numbers included: the quoted run's series rebuilt


def test_quoted_dashboard_has_the_current_format():
    block = next(b for b in code_blocks(README) if any(l.startswith("---- monitor @ iter") for l in b))
    start = next(i for i, l in enumerate(block) if l.startswith("---- monitor @ iter"))
    quoted = block[start:start + 7]
    window = {"loss": 1.0, "lr": 1e-3, "grad_norm": 2.0, "clipped": 0.0,
              **{f"{n}{w}": 0.25 for n in ("loss_rpn_cls", "loss_rpn_box", "loss_roi_cls", "loss_roi_box")
                 for w in ("", "_weighted")},
              S.RPN_POS: 3.0, S.ROI_POS: 20.0, S.GT_PER_IMAGE: 3.0, S.ROI_PROPOSAL_IOU: 0.6, S.ROI_PRED_IOU: 0.9, S.RPN_PRED_IOU: 0.8,
              S.ROI_DELTA_STD_RATIO: 0.9, S.ROI_DELTA_CORR: 0.9}
    seen = ProbeResult(ThresholdCounts((0.05, 0.3, 0.5, 0.7), (5.0, 3.0, 3.0, 3.0), 3.0),
                       ClassDiagnosis(fg_mass=1.0, correct=0.9, accuracy=1.0, margin=0.9, spread=0.6))
    printed = format_dashboard(600, 600, PeriodMeans.from_means(window), seen).splitlines()
    assert len(quoted) == len(printed)
    for line, reference in zip(quoted, printed):
        assert as_pattern(reference).match(line), (line, reference)


def test_every_monitor_threshold_is_documented():
    table = (ROOT / "docs" / "monitor.md").read_text()
    keys = [f"monitor.{name}" for name in ("sustain", "dominant_share", "flat_window", "repeat_every")]
    for name, field in MonitorConfig.model_fields.items():
        group = field.annotation
        if isinstance(group, type) and issubclass(group, Limits):
            keys += [f"monitor.{name}.{sub}" for sub in group.model_fields]
    keys += [f"monitor.collapse.{sub}" for sub in ("min_ratio", "patience", "drop", "settle_ratio")]
    assert [k for k in keys if f"| `{k}` |" not in table] == []
    for name, field in MonitorConfig.model_fields.items():
        group = field.annotation
        if isinstance(group, type) and issubclass(group, Limits):
            assert all(f.description for f in group.model_fields.values()), name
