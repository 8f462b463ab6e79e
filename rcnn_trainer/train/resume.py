"""What `--resume` may and may not change, and how a checkpoint's state is put back."""

from __future__ import annotations

from rcnn_trainer.config_loader import flatten
from rcnn_trainer.errors import UserError

# Config keys a resume must not change (they change what the weights mean or what data they see).
RESUME_FIXED_PREFIXES = ("model.", "data.")
RESUME_FREE_KEYS = {"data.num_workers"}


def compare_resume_config(saved: dict, current: dict) -> list[str]:
    """Refuse changes that matter; return the other differences to log. A key the checkpoint's
    config lacks was added to the schema after it was written (a resolved config holds every key):
    its value is logged, never a reason to refuse."""
    old, new = flatten(saved), flatten(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    fatal = [k for k in changed if k.startswith(RESUME_FIXED_PREFIXES) and k not in RESUME_FREE_KEYS and k in old]
    if fatal:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fatal[:6])
        raise UserError(f"--resume refused: the config changed in a way that matters ({shown}). Resume with the "
                        f"original values, or start a new run with a different --output-dir.")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]
