"""Means over the per-iteration records of one monitor period."""

from __future__ import annotations

import math


def window_means(records: list[dict]) -> dict:
    """Mean of every number over the records, ignoring NaN (e.g. IoU with no positives). Every
    key of any record counts: a skipped last step has no grad_norm, the period still does."""
    out = {}
    for key in dict.fromkeys(k for r in records for k in r):
        values = [r[key] for r in records if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
        out[key] = sum(values) / len(values) if values else float("nan")
    return out
