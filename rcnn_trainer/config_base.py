"""What every config section shares: the strict base model and the file check of its paths."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def found_on_disk(path: Path, folder: bool = False) -> bool:
    """Path.is_file / is_dir, but False for a name no file can have (over NAME_MAX), not an OSError."""
    try:
        return path.is_dir() if folder else path.is_file()
    except OSError:
        return False
