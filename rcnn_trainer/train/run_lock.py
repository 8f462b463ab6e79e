"""One writer per run folder: a POSIX record lock (fcntl.lockf) on `<output_dir>/.lock`, held for
the whole run.

Why lockf and not flock: a flock belongs to the open file description, which forked DataLoader
workers inherit, so after a SIGKILL of the trainer its orphaned workers kept the folder locked
until they noticed (a --resume in that window was refused naming the dead pid). A POSIX lock
belongs to the process alone: children never hold it, and the kernel drops it when the process
dies. POSIX locks do not conflict within one process, so a set of held paths refuses a second
lock taken by the same process. The file is opened with O_NOFOLLOW: a `.lock` planted as a link
to someone's file is refused, never truncated. It keeps the holder's pid for the message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from rcnn_trainer.errors import UserError

LOCK_NAME = ".lock"
_HELD_HERE: set[str] = set()  # lock files this process holds


class RunLock:
    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        key = os.path.realpath(self.path)
        if key in _HELD_HERE:
            raise UserError(f"output dir '{self.path.parent}' is in use by another run in this process "
                            f"(lock file '{self.path}'). Use another --output-dir.")
        fd = self._open()
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise UserError(f"lock file '{self.path}' cannot be locked: {err.strerror or err}.") from None
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"output dir '{self.path.parent}' is in use by another run (pid {holder}, lock file "
                            f"'{self.path}'). Wait for it to finish, stop it, or use another --output-dir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        _HELD_HERE.add(key)
        return self

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise UserError(f"lock file '{self.path}' is a symbolic link; rcnn_trainer does not follow it "
                                f"(it would truncate the file it points to). Remove it or use another "
                                f"--output-dir.") from None
            raise UserError(f"output dir '{self.path.parent}' cannot be created or written: {err.strerror or err}. "
                            f"Choose another output_dir / --output-dir.") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO: lockf works, ftruncate fails
            os.close(fd)
            raise UserError(f"lock file '{self.path}' is not a regular file; remove it or use another --output-dir.")
        return fd

    def release(self) -> None:
        if self._fd is not None:
            _HELD_HERE.discard(os.path.realpath(self.path))
            os.close(self._fd)  # closing drops the process's POSIX lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
