"""What a case may touch on disk: an audit hook that records every file opened, listed or changed
by Python code while a guard is armed, and snapshots of a folder tree to compare before and after.

Used by the hostile-input cases (tests/fuzz_inputs.py, tests/hostile_*.py): a loader reads
only under its data folder (and Python's own files), a command writes only under its output
folder, and the user's files around them stay byte for byte as they were. The hook sees Python
level I/O (open, os.open, os.replace, os.remove, os.mkdir, os.scandir, ...), which is every
write rcnn_trainer makes; C libraries opening files themselves (FreeType's fonts) are not seen,
so a snapshot of the sandbox is compared as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import site
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# events that change the file system: the first argument is the path (os.rename: both are)
CHANGE_EVENTS = {"os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.symlink", "os.link", "os.chmod",
                 "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "os.mkfifo", "os.mknod"}
LIST_EVENTS = {"os.scandir", "os.listdir"}
# where Python and its packages read their own files (imports, PIL plugins, fonts, /proc for torch)
SYSTEM_READS = tuple(sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                          *site.getsitepackages(), site.getusersitepackages(),
                                                          str(Path(__file__).resolve().parents[1]))}
                            | {"/usr", "/proc", "/sys", "/dev", "/etc/ssl"}))


def under(path, root) -> bool:
    path, root = os.fspath(path), os.fspath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass
class Guard:
    """Records what breaks the rules while armed: a write (or change) outside `writable` (judged
    where it really lands: links in the folders followed), a read or listing outside `readable`
    (judged by the path as written, '..' resolved; None: reads are not judged)."""

    writable: tuple[str, ...]
    readable: tuple[str, ...] | None = None
    violations: list[str] = field(default_factory=list)
    opened: int = 0

    def on_event(self, event: str, args: tuple) -> None:
        if event == "open":
            path, _mode, flags = args
            if not isinstance(path, (str, bytes, os.PathLike)):
                return  # a file descriptor
            self.opened += 1
            if flags & WRITE_FLAGS:
                self._check_write(path, follow_last=not flags & os.O_NOFOLLOW and not flags & os.O_EXCL, what="open")
            else:
                self._check_read(path, "open")
        elif event in CHANGE_EVENTS:
            for path in args[:2] if event in ("os.rename", "os.link", "shutil.move") else args[:1]:
                if isinstance(path, (str, bytes, os.PathLike)):
                    self._check_write(path, follow_last=event in ("os.chmod", "os.chown", "os.truncate",
                                                                  "os.utime"), what=event)
        elif event in LIST_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
            self._check_read(args[0], event)

    def _check_write(self, path, follow_last: bool, what: str) -> None:
        path = os.path.abspath(os.fsdecode(path))
        folder, name = os.path.split(path)
        real = os.path.realpath(path) if follow_last else os.path.join(os.path.realpath(folder), name)
        if what == "os.mkdir" and any(under(root, real) for root in self.writable):
            return  # a parent of the output folder, made to make it
        if not any(under(real, root) for root in self.writable):
            self.violations.append(f"{what} writes '{path}' (lands at '{real}'), outside {list(self.writable)}")

    def _check_read(self, path, what: str) -> None:
        if self.readable is None:
            return
        path = os.path.normpath(os.path.abspath(os.fsdecode(path)))
        if not any(under(path, root) for root in (*self.readable, *SYSTEM_READS)):
            self.violations.append(f"{what} reads '{path}', outside {list(self.readable)}")


_ARMED: list[Guard] = []
_IN_HOOK = [False]


def _hook(event: str, args: tuple) -> None:
    if not _ARMED or _IN_HOOK[0]:
        return
    _IN_HOOK[0] = True  # realpath inside the hook must not report itself
    try:
        _ARMED[-1].on_event(event, args)
    finally:
        _IN_HOOK[0] = False


_INSTALLED = [False]


@contextlib.contextmanager
def guarded(writable=(), readable=None):
    """Yields the Guard recording this block's file system use. Audit hooks cannot be removed: one
    is installed once per process and does nothing while no guard is armed."""
    if not _INSTALLED[0]:
        sys.addaudithook(_hook)
        _INSTALLED[0] = True
    guard = Guard(tuple(os.path.realpath(p) for p in writable),
                  None if readable is None else tuple(os.path.normpath(os.path.abspath(p)) for p in readable))
    _ARMED.append(guard)
    try:
        yield guard
    finally:
        _ARMED.remove(guard)


def snapshot(root: Path) -> dict[str, tuple]:
    """{relative path: (kind, content hash or link target)} of everything under `root`, links not
    followed."""
    entries: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                entry = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                entry = ("dir",)
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    entry = ("file", hashlib.sha1(f.read()).hexdigest())
            else:
                entry = ("other", stat.S_IFMT(info.st_mode))
            entries[os.path.relpath(path, root)] = entry
    return entries


def changes(before: dict, after: dict, skip=(), keep=()) -> list[str]:
    """What differs between two snapshots, except under the relative paths `skip`, where only the
    entries `keep` (the user's files there) must be as they were."""
    def skipped(rel):
        return any(rel == s or rel.startswith(s + os.sep) for s in skip) and rel not in keep
    def made_for_skipped(rel):  # a parent of the output folder, made to make it
        return rel not in before and after.get(rel) == ("dir",) and any(s.startswith(rel + os.sep) for s in skip)
    found = []
    for rel in sorted(set(before) | set(after)):
        if skipped(rel) or before.get(rel) == after.get(rel) or made_for_skipped(rel):
            continue
        found.append(f"'{rel}': {before.get(rel, 'absent')} -> {after.get(rel, 'absent')}")
    return found


# the user's files planted beside each case (None: a small PNG), compared byte for byte after it
USER_FILES = {"user/notes.txt": b"the user's notes\n", "user/dir/keep.txt": b"keep me\n",
              "user/config.yaml": b"seed: 7  # the user's own\n", "outside/secret.png": None}


def plant_user_files(sandbox: Path) -> None:
    import io

    from PIL import Image

    for rel, data in USER_FILES.items():
        path = sandbox / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            buffer = io.BytesIO()
            Image.new("RGB", (8, 6), (200, 30, 30)).save(buffer, format="PNG")
            data = buffer.getvalue()
        path.write_bytes(data)
