"""BatchingThread: every item handled once, in order, in batches; a failing batch is survived."""

from __future__ import annotations

import threading

from core.batching import BatchingThread


class Recorder(BatchingThread[int]):
    batch_size = 10

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate
        self.batches: list[list[int]] = []

    def handle(self, batch: list[int]) -> None:
        self.gate.wait(10)  # hold the first batch so that the others queue up behind it
        self.batches.append(batch)
        if 13 in batch:
            raise RuntimeError("a bad batch")


def test_waiting_items_go_in_batches_in_order_and_a_failure_is_survived() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)
    for item in range(25):
        recorder.put(item)
    gate.set()
    recorder.close()
    handled = [item for batch in recorder.batches for item in batch]
    assert handled == list(range(25))
    assert max(len(batch) for batch in recorder.batches) == 10  # up to batch_size at once
    assert len(recorder.batches) <= 4  # the 24 that queued behind the first went in batches
    assert not recorder.running


def test_close_without_items_and_put_after_close() -> None:
    gate = threading.Event()
    gate.set()
    recorder = Recorder(gate)
    recorder.close()
    recorder.put(1)  # starts the thread again
    recorder.close()
    assert recorder.batches == [[1]]
