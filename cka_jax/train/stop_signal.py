"""Stop on SIGTERM/SIGINT at the next step instead of dying: the training loop polls the flag,
checkpoints and returns."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopOnSignal:
    """Context manager: SIGTERM/SIGINT set a flag instead of killing the process.

    The training loop polls :meth:`is_set`, checkpoints and returns. A second SIGINT raises
    ``KeyboardInterrupt`` as usual. Handlers are restored on exit; works in the main thread.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._signals = signals
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self.received: int | None = None

    def _handle(self, signum, frame):
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
