"""The writers' thread: training hands over records and never waits on a tracker.

The training thread only puts an item in a bounded queue (`put_nowait`: a few microseconds;
when the queue is full the item is dropped and counted, reported at the end). One background
thread turns each record into tags (tags.py) and calls every writer. A writer that raises (its
package missing, its server unreachable, a full disk) is reported once through `say` and
switched off; the others and the training go on. metrics.jsonl keeps every number regardless.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Callable

from rcnn_trainer.writers.tags import split_record

PARAMS_METRICS = {"summary/AP": 0.0, "summary/AP50": 0.0}  # the final metrics shown beside the hparams


class Writers:
    """Fan-out to the configured writers (none: every call returns at once)."""

    def __init__(self, backends: list = (), say: Callable[[str], None] = print, queue_size: int = 10000,
                 close_timeout_s: float = 30.0, resume_step: int | None = 0, params: dict | None = None):
        self._backends = list(backends)
        self._say, self._close_timeout = say, close_timeout_s
        self.dropped = 0
        self.failed: dict[str, str] = {}  # writer name -> the error that switched it off
        self.busy_s = 0.0  # CPU time the writers' thread spent after opening (docs/writers.md: its share of an iteration)
        self.open_s = 0.0  # ... and opening (an MLflow run created, the config logged): once per run
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = None
        if self._backends:
            self._queue.put(("open", resume_step, dict(params or {})))
            self._thread = threading.Thread(target=self._work, name="rcnn-writers", daemon=True)
            self._thread.start()

    @property
    def names(self) -> list[str]:
        return [b.name for b in self._backends]

    def record(self, record: dict) -> None:
        """A metrics.jsonl record (MetricsLog.write calls this for every line it writes)."""
        self._put(("record", dict(record)))

    def text(self, tag: str, text: str, step: int) -> None:
        self._put(("text", tag, text, step))

    def picture(self, tag: str, path: Path, step: int) -> None:
        self._put(("picture", tag, Path(path), step))

    def artifact(self, path: Path, folder: str = "") -> None:
        self._put(("artifact", Path(path), folder))

    def flush(self) -> None:
        """Ask the writers to put what they hold on disk (at each checkpoint: what resume keeps)."""
        self._put(("flush",))

    def close(self, status: str = "FINISHED") -> None:
        """Send what is queued (up to logging.close_timeout_s), end the writers' runs, stop the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        deadline = time.monotonic() + self._close_timeout
        try:
            self._queue.put(("close", status), timeout=self._close_timeout)
        except queue.Full:
            pass
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            self._say(f"[writers] {', '.join(self.live_names())} still sending after logging.close_timeout_s="
                      f"{self._close_timeout:g} s; left behind (metrics.jsonl has every number).")
        if self.dropped:
            self._say(f"[writers] {self.dropped} items dropped: the writers' queue (logging.queue_size="
                      f"{self._queue.maxsize}) was full; metrics.jsonl has every number.")

    def live_names(self) -> list[str]:
        return [b.name for b in self._backends if b.name not in self.failed]

    def _put(self, item: tuple) -> None:
        if self._thread is None:
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            started = time.thread_time()
            self._handle(item)
            if self._queue.empty() and item[0] != "close":
                self._each(lambda b: b.flush())
            spent = time.thread_time() - started
            if item[0] == "open":
                self.open_s += spent
            else:
                self.busy_s += spent
            if item[0] == "close":
                return

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "open":
            _, resume_step, params = item
            self._each(lambda b: b.open(resume_step))
            if params:
                self._each(lambda b: b.params(params, PARAMS_METRICS))
        elif kind == "record":
            parts = split_record(item[1])
            self._each(lambda b: b.scalars(parts.step, parts.scalars) if parts.scalars else None)
            for tag, text in parts.texts.items():
                self._each(lambda b: b.text(tag, text, parts.step))
        elif kind == "text":
            self._each(lambda b: b.text(item[1], item[2], item[3]))
        elif kind == "picture":
            self._each(lambda b: b.picture(item[1], item[2], item[3]))
        elif kind == "artifact":
            self._each(lambda b: b.artifact(item[1], item[2]))
        elif kind == "flush":
            self._each(lambda b: b.flush())
        elif kind == "close":
            self._each(lambda b: b.close(item[1]))

    def _each(self, call: Callable) -> None:
        for backend in self._backends:
            if backend.name in self.failed:
                continue
            try:
                call(backend)
            except Exception as err:  # noqa: BLE001 - any failure of a tracker must leave training alone
                self.failed[backend.name] = f"{type(err).__name__}: {err}"
                self._say(f"[writers] {backend.name} failed and is off for the rest of this run ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:300] if str(err) else 'no message'}); training goes on, "
                          f"metrics.jsonl has every number.")
