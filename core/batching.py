"""A background thread that handles queued items in batches: all that wait, up to a limit."""

from __future__ import annotations

import logging
import threading
import time
from queue import Empty, SimpleQueue
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class BatchingThread(Generic[T]):
    """Items put with :meth:`put` are handed to :meth:`handle` in batches, in order, by one
    daemon thread (started with the first item).

    A batch is what is waiting when the thread gets to it: one item when items are rare, many
    under load, so a per-batch cost (a commit, a broker round trip) is shared as load grows
    instead of adding to each item's wait.
    """

    name = "batching"
    batch_size = 200
    # Under load (the previous batch began less than ``busy_seconds`` ago), how long to let a
    # batch fill after its first item: a little latency for a bigger batch. An item that comes
    # alone is handled at once.
    linger_seconds = 0.0
    busy_seconds = 0.05

    def __init__(self) -> None:
        self._pending: SimpleQueue[T | None] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._last_batch_at = float("-inf")

    def handle(self, batch: list[T]) -> None:
        """Deal with one batch; an exception escaping it is the subclass's bug."""
        raise NotImplementedError

    def release(self) -> None:
        """Let go of what :meth:`handle` holds between batches (called once the thread ended)."""

    def put(self, item: T) -> None:
        """Queue an item; returns at once."""
        with self._lock:
            if not self.running:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._pending.put(item)

    def close(self, timeout: float = 10.0) -> None:
        """Handle what is queued (waiting at most ``timeout`` seconds), then stop the thread."""
        with self._lock:
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._pending.put(None)
            thread.join(timeout)
        if not self.running:
            self.release()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self.handle(batch)
            except Exception:  # noqa: BLE001 - the thread must outlive a bad batch
                log.exception("%s: a batch of %d failed", self.name, len(batch))

    def _next_batch(self) -> list[T] | None:
        """Wait for an item, then take what else is waiting; None once closed."""
        first = self._pending.get()
        if first is None:
            return None
        batch = [first]
        now = time.monotonic()
        if self.linger_seconds and now - self._last_batch_at < self.busy_seconds:
            time.sleep(self.linger_seconds)
        self._last_batch_at = now
        while len(batch) < self.batch_size:
            try:
                item = self._pending.get_nowait()
            except Empty:
                break
            if item is None:  # closed: handle this batch, then stop
                self._pending.put(None)
                break
            batch.append(item)
        return batch
