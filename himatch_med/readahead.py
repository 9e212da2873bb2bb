"""Reading ahead: the next items of an iterator made in a background thread while the caller works on this one.

Building a bank reads and prepares each reference (decompressing, reorienting, intensities, foreground) between
backbone batches; on a GPU that would leave the device idle for the reading of every file. Reading, numpy and torch
release the GIL for their heavy parts, so one thread is enough to hide it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")

_DONE = object()


def read_ahead(items: Iterable[Item], depth: int = 1) -> Iterator[Item]:
    """Yield ``items`` in order while a background thread makes up to ``depth`` of the next ones.

    An exception raised while making an item is raised here, where that item would have come. Closing the iterator
    (or leaving the loop, or an interruption) stops the thread after the item it is making: nothing more is read.
    ``depth`` 0 makes the items here, in the caller's thread.
    """
    if depth < 1:
        yield from items
        return
    made: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                made.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as error:  # handed to the caller, raised where the item would have come
            put((None, error))
            return
        put((_DONE, None))

    # A daemon: a thread stuck reading a slow file must not keep the process alive after Ctrl-C.
    thread = threading.Thread(target=work, name="himatch-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = made.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
