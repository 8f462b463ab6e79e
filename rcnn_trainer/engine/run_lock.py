"""One writer per run folder: an advisory lock (fcntl.flock) on `<output_dir>/.lock`, held for
the whole run. The kernel releases it when the process dies, so a killed run never blocks the
next one; the file keeps the holder's pid so a refused run can say who holds it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from rcnn_trainer.errors import UserError

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._file = None

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")
        except OSError as err:
            raise UserError(f"output dir '{self.path.parent}' cannot be created or written: {err.strerror or err}. "
                            f"Choose another output_dir / --output-dir.") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UserError(f"output dir '{self.path.parent}' is in use by another run (pid {holder}, lock file "
                            f"'{self.path}'). Wait for it to finish, stop it, or use another --output-dir.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
