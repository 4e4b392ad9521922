"""Worker threads: each runs one blocking step and reports its outcome to the supervisor."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class WorkerPool:
    """Daemon threads running steps; outcomes go back to the loop's event queue."""

    def __init__(self, name: str, size: int, events: queue.SimpleQueue[tuple[Any, ...]]) -> None:
        self.size = size
        self.busy = 0
        self._tasks: queue.SimpleQueue[tuple[Callable[[], Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._events = events
        for index in range(size):
            threading.Thread(target=self._work, name=f"{name}-{index}", daemon=True).start()

    @property
    def free(self) -> int:
        return self.size - self.busy

    def submit(self, function: Callable[[], Any], tag: tuple[Any, ...]) -> None:
        self.busy += 1
        self._tasks.put((function, tag))

    def _work(self) -> None:
        while True:
            item = self._tasks.get()
            if item is None:
                return
            function, tag = item
            try:
                outcome: Any = function()
                error: BaseException | None = None
            except BaseException as caught:  # every outcome goes back to the loop
                outcome, error = None, caught
            self._events.put(("done", *tag, outcome, error))
