"""How a run ends when something outside it stops it: a signal, a full disk, checkpoints that cannot be read.

Each ends in a ``RunError`` whose message is one line saying what happened and what to do; ``crate-train`` prints
that line (``--debug``: the traceback too) and exits with the error's status.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class RunError(Exception):
    """A run stopped by a fault it handled; the message is one line: what happened, what to do."""

    exit_code = 1


class RunInterruptedError(RunError):
    """SIGINT or SIGTERM stopped the run after it saved a checkpoint; exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """While active, SIGINT (Ctrl-C) and SIGTERM only set ``signum``: the loop finishes its step, saves, and stops.

    A second signal raises ``KeyboardInterrupt`` at once (stop without saving) in a single process. Under torchrun
    it is ignored: the launcher forwards the signal it got to its workers, so each may see it twice, and the ranks
    must stop together (the loop agrees on ``signum`` across ranks).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, repeat_stops_at_once: bool):
        self.signum = 0
        self.repeat_stops_at_once = repeat_stops_at_once
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum and self.repeat_stops_at_once:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
