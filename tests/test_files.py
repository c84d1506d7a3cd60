"""crate_kernels.files: what a kill or a full disk leaves behind while a file is written or appended to."""

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from crate_kernels import files

ROOT = Path(__file__).resolve().parents[1]


def test_files_kill_during_replace_keeps_the_old_file(tmp_path):
    """SIGKILL in the middle of writing the new content: the old file is whole, a .tmp is left for the next start."""
    target = tmp_path / "config.json"
    target.write_text('{"steps": 8}\n')
    script = (
        "import os, signal, sys\n"
        "from crate_kernels import files\n"
        "with files.replacing_file(sys.argv[1]) as f:\n"
        "    f.write('{\"ste')\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(target)], cwd=ROOT, env=os.environ | {"PYTHONPATH": "."})
    assert done.returncode == -signal.SIGKILL
    assert target.read_text() == '{"steps": 8}\n'
    assert files.remove_leftovers(tmp_path) == [tmp_path / "config.json.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_files_failed_write_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "metrics.png"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="No space left") as info, files.replacing_file(target, "wb") as f:
        f.write(b"new, partly")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write on a full disk raises: no file name
    assert info.value.filename == str(target) and info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["metrics.png"]


def test_files_replacing_a_folder(tmp_path):
    final = tmp_path / "step_0000004"
    final.mkdir()
    (final / "stale.pt").write_text("old")
    with files.replacing(final) as tmp:
        tmp.mkdir()
        files.write_text(tmp / "train.pt", "new")
    assert [p.name for p in final.iterdir()] == ["train.pt"] and not files.temporary(final).exists()


def test_files_torn_jsonl_line_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    files.append_line(path, '{"step": 1}')
    files.append_line(path, '{"step": 2}')
    with open(path, "a") as f:
        f.write('{"step": 3, "train_lo')  # an append cut short by a full disk
    assert files.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert "dropped line 3" in capsys.readouterr().err
    assert files.read_jsonl(tmp_path / "none.jsonl") == []


def test_files_disk_full_is_found_behind_other_errors():
    full = OSError(errno.ENOSPC, "No space left on device", "x.distcp")
    try:
        try:
            raise full
        except OSError as err:
            raise RuntimeError("checkpoint failed") from err
    except RuntimeError as err:
        assert files.disk_full(err) is full

    from torch.distributed.checkpoint.api import CheckpointException

    assert files.disk_full(CheckpointException("write", {1: (full, None)})) is full  # DCP's report of rank 1's error
    assert files.disk_full(OSError(errno.EACCES, "Permission denied")) is None
