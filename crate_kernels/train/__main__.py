"""``crate-train`` / ``python -m crate_kernels.train``: every config field is a flag; see ``--help``."""

from __future__ import annotations

import os
import sys

from crate_kernels.train.config import ConfigError, parse_args
from crate_kernels.train.faults import RunError, RunInterruptedError
from crate_kernels.train.loop import train


def _one_line(err: BaseException) -> tuple[str, int]:
    """What ``crate-train`` prints for ``err``, and its exit status."""
    if isinstance(err, ConfigError):
        return f"error: {err}", 2
    if isinstance(err, RunError):
        return str(err), err.exit_code
    if isinstance(err, KeyboardInterrupt):  # a second Ctrl-C, or one before training began
        return "interrupted; nothing saved since the last checkpoint; run the same command to resume from it", 130
    return f"error: {err}", 1


def main(argv: list[str] | None = None) -> None:
    """Parse, train. A user error or a fault ends in one line on stderr and a non-zero status, never a traceback
    (``--debug`` shows it): a configuration that cannot work exits with status 2 before training; SIGINT/SIGTERM
    with 128 + the signal, after saving a checkpoint; a full disk or another I/O error with 1."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        train(parse_args(argv))
    except (ConfigError, RunError, OSError, KeyboardInterrupt) as err:
        if "--debug" in argv:
            raise
        message, status = _one_line(err)
        # Every rank reaches the same configuration error and the same interrupted step: rank 0 says it once.
        if not isinstance(err, (ConfigError, RunInterruptedError)) or os.environ.get("RANK", "0") == "0":
            print(f"crate-train: {message}", file=sys.stderr)
        sys.exit(status)


if __name__ == "__main__":
    main()
