"""Phase timings for benchmarks: ``with timer("backbone"): ...`` adds the block's wall time to that phase."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Timer:
    """Accumulates wall time per phase.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs at both ends of a phase so that asynchronous GPU work is charged
    to the phase that launched it.
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Time the enclosed block as ``phase``."""
        if self.sync:
            self.sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            self.seconds[phase] += time.perf_counter() - started


class NoTimer:
    """A timer that measures nothing (the default of library functions)."""

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Run the block untimed."""
        yield


NO_TIMER = NoTimer()
