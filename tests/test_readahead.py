"""Reading ahead: items come in order, errors where they happened, and nothing is read after the caller stops."""

from __future__ import annotations

import threading
import time

import pytest

from himatch_med.readahead import read_ahead


def test_items_come_in_order_made_in_another_thread():
    threads = []

    def items():
        for number in range(20):
            threads.append(threading.current_thread())
            yield number

    assert list(read_ahead(items(), depth=2)) == list(range(20))
    assert all(thread is not threading.current_thread() for thread in threads)
    assert list(read_ahead(iter(range(5)), depth=0)) == list(range(5))


def test_the_next_item_is_made_while_the_caller_works_on_this_one():
    making_the_next = threading.Event()

    def items():
        yield 0
        making_the_next.set()
        yield 1

    ahead = read_ahead(items())
    assert next(ahead) == 0
    # The caller still holds item 0 (the backbone on its slices) while the next reference is read.
    assert making_the_next.wait(timeout=30)
    assert list(ahead) == [1]


def test_an_error_is_raised_where_its_item_would_have_come():
    def failing():
        yield 1
        yield 2
        raise OSError("reference 3: disk gone")

    seen = []
    with pytest.raises(OSError, match="disk gone"):
        for item in read_ahead(failing()):
            seen.append(item)
    assert seen == [1, 2]


def test_nothing_more_is_read_once_the_caller_stops():
    made = []

    def items():
        for number in range(100):
            made.append(number)
            yield number

    ahead = read_ahead(items(), depth=1)
    assert next(ahead) == 0
    ahead.close()
    # The thread ends: it does not stay blocked on the full queue (a thread that ignored the stop would).
    deadline = time.monotonic() + 10
    while any(t.name == "himatch-read-ahead" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "himatch-read-ahead" for t in threading.enumerate())
    # The one taken, one waiting in the queue, at most one being made when the stop came.
    assert len(made) <= 3
