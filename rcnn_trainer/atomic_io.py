"""Writing files so that a process killed at any moment (SIGKILL included) leaves each one either
complete or absent: never a truncated file under its final name.

A whole file goes to a hidden temporary beside it, is fsynced and renamed over the name (rename is
atomic on POSIX). A log line is appended with one write() to an O_APPEND descriptor: a kill cannot
stop a single write to a local file half way (the kernel finishes it), so a line is whole or
missing.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(f)` fills a temporary beside `path`; it is fsynced, renamed over `path`, and the
    folder is fsynced so the rename itself survives a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp: an unpredictable name opened with O_EXCL, so a link planted beside it is never followed
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0o600 would hide results from the user's group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_image(image, path: Path) -> None:
    """A PIL image (format from the suffix) or a matplotlib figure, written atomically."""
    buffer = io.BytesIO()
    if hasattr(image, "savefig"):
        image.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=90)
    else:
        image.save(buffer, format=image_format(path))
    atomic_write_bytes(path, buffer.getvalue())


def image_format(path: Path) -> str:
    """PIL's format name for the common suffixes."""
    suffix = Path(path).suffix.lower()
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}.get(suffix, "PNG")


def append_line(path: Path, line: str) -> None:
    """Append one line with a single write() (see the module docstring)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    # O_NOFOLLOW: a log name planted as a link to someone's file is refused, not appended to
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):  # only on a full disk or a signal; the reader skips a cut line
            written += os.write(fd, data[written:])
    finally:
        os.close(fd)
