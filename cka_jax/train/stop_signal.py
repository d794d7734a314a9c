"""Stop on SIGTERM, SIGINT or SIGHUP (the terminal closed) at the next step instead of dying: the
training loop polls the flag, checkpoints and returns.

Several processes (``jax.distributed``) must stop at the same step, so there the signal travels
through JAX's preemption notice instead: ``jax.distributed.initialize`` installs JAX's own SIGTERM
handler, which tells every process through the coordination service, and the loop asks
``reached_preemption(step)``, true on every process at the same step. :meth:`StopOnSignal.hand_over`
routes SIGINT, SIGHUP and a signal received before the processes connected into that notice.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any


class StopOnSignal:
    """Context manager: SIGTERM, SIGINT and SIGHUP set a flag instead of killing the process.

    The training loop polls :meth:`is_set`, checkpoints and returns. A second SIGINT raises
    ``KeyboardInterrupt`` as usual. Handlers are restored on exit; works in the main thread.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)):
        self._signals = signals
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self._handed_over = False
        self.received: int | None = None

    def _handle(self, signum, frame):
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.record(signum)

    def record(self, signum: int) -> None:
        """Act on ``signum`` as if received now (one that arrived before this object handled signals)."""
        self.received = signum
        self._event.set()
        if self._handed_over and signum != signal.SIGTERM:  # a SIGTERM here: JAX's handler is not installed
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's handler: every process stops

    def is_set(self) -> bool:
        """Whether to stop; always False once :meth:`hand_over` routed signals to JAX's preemption notice."""
        return self._event.is_set() and not self._handed_over

    def hand_over(self) -> None:
        """Call after ``jax.distributed.initialize``: from now on every stop signal is a SIGTERM to JAX's
        handler (which ``initialize`` installed over this one), so that every process stops at the same
        step (the loop asks ``reached_preemption``). A signal received before is handed over now; SIGINT
        records itself in :attr:`received` (the exit status) and becomes a SIGTERM."""
        self._handed_over = True
        if threading.current_thread() is threading.main_thread() and signal.SIGINT in self._signals:
            signal.signal(signal.SIGINT, self._handle)
        if self._event.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
