"""Files that a kill, a crash or a full disk never leaves half-written.

Every file is written under a temporary name beside it (``<name>.tmp``), flushed and fsynced, then renamed over the
old one, and the folder fsynced: a reader sees the old file or the new one, never a torn one. A write that fails
removes its temporary; one cut short by a kill leaves it behind, and ``remove_leftovers`` clears it at the next start.
Appends (``append_line``) cannot be made atomic this way: ``read_jsonl`` drops a torn line instead.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"


def fsync(path: str | Path) -> None:
    """Make a file's content, or a folder's entries (a rename, a new file), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary(path: str | Path) -> Path:
    """Where ``replacing(path)`` writes before the rename."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def _os_error(err: BaseException, errnos: tuple[int, ...] = ()) -> OSError | None:
    """The ``OSError`` (with one of ``errnos``, when given) that ``err`` is or that caused it, if any."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and (not errnos or current.errno in errnos):
            return current
        stack += [current.__cause__, current.__context__]
        # torch.distributed.checkpoint collects each rank's exception in ``failures``: {rank: (exception, trace)}.
        stack += [failure[0] for failure in getattr(current, "failures", {}).values()]
    return None


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` naming the file it failed on (``path`` when it names none: a failed ``write`` does not say)."""
    return type(err)(err.errno, err.strerror or os.strerror(err.errno or 0), err.filename or str(path))


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write ``path``'s new content to (a file, or a folder of files each written with
    ``replacing``); on success it is fsynced and renamed over ``path``.

    A failed write removes the temporary, the old ``path`` untouched; one caused by an ``OSError`` (a full disk;
    ``torch.save`` reports it as a ``RuntimeError`` caused by one) comes out as that ``OSError``, naming the file.
    """
    path, tmp = Path(path), temporary(path)
    _remove(tmp)
    try:
        yield tmp
        fsync(tmp)
        if path.is_dir():
            shutil.rmtree(path)  # a folder cannot be renamed over a non-empty one
        os.replace(tmp, path)
        fsync(path.parent)
    except Exception as err:
        _remove(tmp)
        cause = _os_error(err)
        if cause is None:
            raise
        raise _naming(cause, path) from err


@contextlib.contextmanager
def replacing_file(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """``open(path, mode)`` (``"w"`` or ``"wb"``) that replaces ``path`` atomically when the block ends."""
    with replacing(path) as tmp, open(tmp, mode) as f:
        yield f


def write_text(path: str | Path, text: str) -> Path:
    """``Path(path).write_text(text)``, atomically; returns the path."""
    with replacing_file(path) as f:
        f.write(text)
    return Path(path)


def save_figure(fig: Any, path: str | Path, **savefig: Any) -> None:
    """``fig.savefig(path, **savefig)`` (a matplotlib figure), atomically; the format from the suffix."""
    path = Path(path)
    with replacing_file(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", **savefig)


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` (no newline) and a newline, fsynced; a full disk raises ``OSError`` naming ``path``."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise _naming(err, Path(path)) from err


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (none when it does not exist).

    A line that is not a JSON object (the torn end of an append cut short by a kill or a full disk) is dropped with
    a warning on stderr.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records, dropped = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            dropped.append(number)
    if dropped:
        lines = ", ".join(map(str, dropped))
        print(f"warning: {path}: dropped line {lines} (not a JSON object: a write cut short)", file=sys.stderr)
    return records


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Delete the ``*.tmp`` files and folders that interrupted writes left directly in ``folder``; returns them."""
    found = sorted(Path(folder).glob("*" + TMP_SUFFIX))
    for path in found:
        _remove(path)
    return found


def disk_full(err: BaseException) -> OSError | None:
    """The ``OSError`` "no space left" (or "quota exceeded") behind ``err``, if a full disk caused it."""
    return _os_error(err, (errno.ENOSPC, errno.EDQUOT))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
