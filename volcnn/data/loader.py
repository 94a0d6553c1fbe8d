"""``ThreadDataLoader`` whose errors reach the training loop.

MONAI's ``ThreadDataLoader`` batches in a background thread (``monai.data.thread_buffer.ThreadBuffer``). When
producing a batch raises (an unreadable volume, a collate error), that thread dies, the exception is printed by
the thread machinery, and the consuming loop sees the buffer run dry and ends the epoch early: training goes on
with a silently shortened epoch and the run exits 0 (seen with MONAI 1.6.1). This subclass keeps MONAI's
behaviour (same arguments, one batch buffered ahead, ``repeats``) but hands the exception to the consumer, which
raises it in the training loop, where Ignite and the bundle report it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from queue import Empty, Full, Queue
from typing import Any

from monai.data import DataLoader
from monai.data import ThreadDataLoader as MonaiThreadDataLoader

__all__ = ["ThreadDataLoader"]

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def buffered(source: Any, buffer_size: int = 1, repeats: int = 1, poll: float = 0.05) -> Iterator[Any]:
    """Iterate ``source`` in a background thread, ``buffer_size`` items ahead; re-raise its errors here.

    Each item is yielded ``repeats`` times. Stopping early (``break``, an exception in the consumer) stops and joins
    the producer thread.
    """
    queue: Queue = Queue(maxsize=max(1, int(buffer_size)))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=poll)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failure(e))
            return
        put(_END)

    thread = threading.Thread(target=produce, name="volcnn-thread-loader", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = queue.get(timeout=poll)
            except Empty:
                if not thread.is_alive() and queue.empty():  # cannot happen unless the thread was killed
                    raise RuntimeError("the data loader thread ended without finishing the epoch") from None
                continue
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            for _ in range(repeats):
                yield item
    finally:
        stop.set()
        thread.join()


class ThreadDataLoader(MonaiThreadDataLoader):
    """MONAI's ``ThreadDataLoader`` (same arguments) that raises a batch's error instead of ending the epoch early.

    Yields what a ``DataLoader`` over ``dataset`` yields, e.g. ``{"image": (B, 1, X, Y, Z), "label": (B,)}`` batches,
    each ``repeats`` times.
    """

    def __iter__(self):  # type: ignore[override]
        yield from buffered(DataLoader.__iter__(self), self.buffer_size, self.repeats)
