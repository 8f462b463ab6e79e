"""Alarm: what was seen (numbers), why it matters, what to change (config keys).
The checks that raise them live in checks.py (training) and preflight.py (data).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Alarm:
    name: str
    seen: str
    why: str
    change: list[str] = field(default_factory=list)  # "config.key: suggestion"
    subject: str | None = None  # what it is about when a check judges several things (flat_loss: the term)

    def format(self) -> str:
        lines = [f"ALARM [{self.name}]", f"  seen:   {self.seen}", f"  why:    {self.why}"]
        lines += [f"  change: {item}" for item in self.change]
        return "\n".join(lines)

    def to_record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

