"""How a run ends when something outside it stops it: a signal, a full disk, checkpoints that cannot be read.

Each ends in a ``RunError`` whose message is one line saying what happened and what to do; ``crate-train`` prints
that line (``--debug``: the traceback too) and exits with the error's status.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from crate_kernels import files


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


def one_line_errors(command: str, body: Callable[[], None]) -> int:
    """Run a command that reads a run and writes files whole (``crate-measure``, ``crate-segment``); return its exit
    status. A user's mistake (bad model, argument, checkpoint or data) ends in one line and status 2, a full disk or
    another I/O error in one line and 1, Ctrl-C in one line and 130: each file already written is complete."""
    try:
        body()
    except (ValueError, TypeError, FileNotFoundError) as err:
        message, status = f"error: {err}", 2
    except OSError as err:
        what = "disk full" if files.disk_full(err) else (err.strerror or str(err))
        message, status = f"{what}: could not write {err.filename or 'an output'}; files written before are whole", 1
    except KeyboardInterrupt:
        message, status = "interrupted; files written before are whole; run the same command again", 130
    else:
        return 0
    print(f"{command}: {message}", file=sys.stderr)
    return status
