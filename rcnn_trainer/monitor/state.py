"""What the monitor remembers between judgments, saved in every checkpoint as a plain dict (so a
resumed run raises the same alarms, and the checkpoint stays weights-only loadable)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class MonitorState:
    history: list[dict] = field(default_factory=list)  # one PeriodMeans (as a plain dict) per judgment
    warmup_end: int | None = None  # index in `history` of the first judgment after warmup
    grad_norms: list[float] = field(default_factory=list)  # the latest pre-clip norms (a bounded tail)
    first_norms: list[float] = field(default_factory=list)  # the run's first finite norms (divergence's reference)
    scales: list[float] = field(default_factory=list)  # AMP loss scale at each judgment
    probe: list[dict] = field(default_factory=list)  # one ProbeResult (as a plain dict) per judgment after warmup
    checks: int = 0  # judgments so far
    initial_loss: float | None = None  # the first step's weighted loss
    expected_initial: float | None = None  # its classification terms' value at zero logits, weighted
    last_shown: dict[str, int] = field(default_factory=dict)  # alarm -> judgment it was last printed in full
    counts: dict[str, int] = field(default_factory=dict)  # alarm -> times raised
    evals: list[dict] = field(default_factory=list)  # {"iter", "val_loss", "train_loss", "AP"} per evaluation
    cause_at: dict[str, int] = field(default_factory=dict)  # cause alarm -> the judgment it last fired in
    cause_iter: dict[str, int] = field(default_factory=dict)  # cause alarm -> the iteration it first fired at
    cause_advice: dict[str, list[str]] = field(default_factory=dict)  # cause alarm -> its advice
    improving: list[str] = field(default_factory=list)  # symptoms the latest judgment held back as on course

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> "MonitorState":
        """From a checkpoint, older ones included: judgments of checkpoints older than the typed
        probe (flat "dets@..." dicts) are dropped, so low_confidence and collapse wait `sustain`
        judgments again; older checkpoints kept the judgments after warmup as a copy."""
        state = dict(state)
        state["probe"] = [p for p in state.get("probe", []) if "counts" in p]
        older = state.pop("after_warmup", None)
        if older and state.get("warmup_end") is None:
            state["warmup_end"] = len(state.get("history", [])) - len(older)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in known})
