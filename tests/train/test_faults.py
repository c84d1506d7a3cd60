"""Faults injected into tiny training runs: signals, full disks, torn and hostile checkpoints, changed configs.

Each ends in one line (a ``RunError`` or ``ConfigError``) and leaves a run that the same command resumes, bit for
bit where a checkpoint survives.
"""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crate_kernels import files
from crate_kernels.train import checkpoint
from crate_kernels.train.__main__ import main
from crate_kernels.train.config import ConfigError
from crate_kernels.train.faults import RunError, RunInterruptedError
from crate_kernels.train.loop import Metrics, train
from tests.train.test_train import ROOT, TINY, losses, tiny

# Dropout, mixup, crops and flips: a resume that lost any random state would not reproduce the losses.
NOISY = {"data__crop_scale": 0.7, "data__hflip": True, "task__mixup": 0.4, "ckpt_every": 2}
NOISY["model__args"] = TINY["model.args"] + ",dropout=0.1,emb_dropout=0.1"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The losses of the uninterrupted noisy run, which every resumed run below must reproduce exactly."""
    path = tmp_path_factory.mktemp("reference")
    train(tiny(path, **NOISY))
    return losses(path / "run")


def cli_flags(tmp_path: Path, **values) -> list[str]:
    return [f"--{k}={v}" for k, v in (TINY | {"out": tmp_path / "run"} | values).items()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class _FullDisk:
    """A file on a disk with ``room`` bytes left: the write that passes it stores what fits, then fails."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room:
            self._f.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._f.close()


def fill_disk(monkeypatch, name: str, mode: str, room: int, after: int = 0) -> None:
    """The disk fills up when ``name`` (or its temporary) is opened in ``mode`` for the ``after + 1``-th time."""
    seen = []

    def full_open(file, mode_="r", *args, **kwargs):
        f = open(file, mode_, *args, **kwargs)  # noqa: SIM115 (an open(): its caller closes it)
        if Path(file).name.removesuffix(files.TMP_SUFFIX) != name or mode_ != mode:
            return f
        seen.append(file)
        return _FullDisk(f, room) if len(seen) > after else f

    monkeypatch.setattr(files, "open", full_open, raising=False)  # every write of a run goes through files


def test_faults_sigint_saves_the_current_step_and_resumes_exactly(tmp_path, monkeypatch, reference):
    run, real_log = tmp_path / "run", Metrics.log

    def log_then_ctrl_c(self, record):
        real_log(self, record)
        if record.get("step") == 3 and "train_loss" in record:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Metrics, "log", log_then_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    message = r"interrupted at step 3; saved \S+step_0000003; run the same command to resume"
    with pytest.raises(RunInterruptedError, match=message) as info:
        train(tiny(tmp_path, **NOISY))
    assert info.value.exit_code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is handler  # the run's own handlers are gone
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_0000002", "step_0000003"]
    monkeypatch.undo()
    train(tiny(tmp_path, **NOISY))
    assert losses(run) == reference


def wait_for_step(metrics: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        records = files.read_jsonl(metrics) if metrics.is_file() else []
        if any(r.get("step", 0) >= step for r in records):
            return
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"the run did not reach step {step}: {process.communicate()[1][-2000:]}")


def test_faults_ctrl_c_on_the_command_line_is_one_line(tmp_path):
    flags = cli_flags(tmp_path, steps=100_000, ckpt_every=1000, eval_every=1000, export=False)
    command = [sys.executable, "-m", "crate_kernels.train", *flags]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "run" / "metrics.jsonl", 2, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in out + err
    last = err.strip().splitlines()[-1]
    found = re.fullmatch(r"crate-train: interrupted at step (\d+); saved (\S+); run the same command to resume", last)
    assert found, last
    assert checkpoint.checkpoints(tmp_path / "run")[-1] == Path(found.group(2))
    assert torch.load(Path(found.group(2)) / "train.pt", weights_only=True)["step"] == int(found.group(1))


@pytest.mark.xdist_group("torchrun")
def test_faults_sigterm_to_one_torchrun_rank_stops_both_at_one_step(tmp_path):
    """SIGTERM reaches rank 1 only: both ranks save the same step (FSDP2, sharded), and the run resumes from it."""
    flags = cli_flags(tmp_path, steps=100_000, ckpt_every=1000, eval_every=1000, export=False)
    flags += ["--parallel=fsdp2", "--optim.grad_accum=2"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*launch, "-m", "crate_kernels.train", *flags]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "run" / "metrics.jsonl", 2, process)
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    rank1 = [pid for pid in children if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()]
    os.kill(int(rank1[0]), signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    found = re.search(r"crate-train: interrupted at step (\d+); saved (\S+); run the same command", err)
    assert found, err[-3000:]
    saved, step = Path(found.group(2)), int(found.group(1))
    assert checkpoint.checkpoints(tmp_path / "run")[-1] == saved
    assert {p.name for p in saved.iterdir()} == {"train.pt", "model_optim", "rng_rank0.pt", "rng_rank1.pt"}
    assert torch.load(saved / "train.pt", weights_only=True)["step"] == step
    done = subprocess.run([*command, f"--max-steps={step + 1}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {saved}" in done.stdout


def test_faults_full_disk_during_a_metrics_append(tmp_path, monkeypatch, capsys, reference):
    """The append that fills the disk leaves a torn last line; once space is back the run resumes exactly."""
    run = tmp_path / "run"
    train(tiny(tmp_path, max_steps=4, **NOISY))
    fill_disk(monkeypatch, "metrics.jsonl", "a", room=10, after=1)  # step 5's record fits, step 6's does not
    with pytest.raises(RunError, match=r"disk full: could not write \S+metrics.jsonl; free space, then run the same"):
        train(tiny(tmp_path, **NOISY))
    assert (run / "metrics.jsonl").read_text().endswith('{"step": 6')  # torn
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_0000002", "step_0000004"]
    monkeypatch.undo()
    capsys.readouterr()
    train(tiny(tmp_path, **NOISY))
    assert "metrics.jsonl: dropped line 7" in capsys.readouterr().err  # after 4 + 1 eval + 1 records
    assert losses(run) == reference


def test_faults_full_disk_during_a_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    """The checkpoint being written is dropped whole, the previous one stays, and the command says so in a line."""
    run = tmp_path / "run"
    train(tiny(tmp_path, max_steps=4))
    before = snapshot(run / "checkpoints")
    fill_disk(monkeypatch, "train.pt", "wb", room=1000)
    with pytest.raises(SystemExit) as info:
        main(cli_flags(tmp_path))
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert re.fullmatch(
        r"crate-train: disk full: could not write \S+/step_0000008.tmp/train.pt; free space, then run the same "
        r"command to resume from step_0000004, which is intact",
        err,
    )
    assert snapshot(run / "checkpoints") == before  # no step_0000008.tmp left behind either
    monkeypatch.undo()
    train(tiny(tmp_path))
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_0000004", "step_0000008"]


class WritesAFile:
    """Unpickling this runs ``exec``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("damage", ["torn", "hostile"])
def test_faults_unreadable_newest_checkpoint_is_named_and_skipped(tmp_path, capsys, reference, damage):
    run = tmp_path / "run"
    train(tiny(tmp_path, max_steps=6, **NOISY))
    newest = checkpoint.checkpoints(run)[-1]
    marker = tmp_path / "ran"
    if damage == "torn":
        data = (newest / "train.pt").read_bytes()
        (newest / "train.pt").write_bytes(data[: len(data) // 2])
    else:
        torch.save({"step": 6, "scheduler": WritesAFile(marker)}, newest / "train.pt")
    capsys.readouterr()
    train(tiny(tmp_path, **NOISY))
    out = capsys.readouterr().out
    assert f"warning: checkpoint {newest} is unreadable (" in out and "set aside as step_0000006.unreadable" in out
    if damage == "hostile":
        assert "the weights-only unpickler refused it: Unsupported global" in out
    assert f"resuming from {run / 'checkpoints' / 'step_0000004'}" in out
    assert not marker.exists()
    assert (run / "checkpoints" / "step_0000006.unreadable" / "train.pt").is_file()
    assert losses(run) == reference


def test_faults_no_readable_checkpoint_is_one_line(tmp_path):
    run = tmp_path / "run"
    train(tiny(tmp_path, max_steps=4))
    (run / "checkpoints" / "step_0000004" / "rng_rank0.pt").write_bytes(b"")
    before = snapshot(run)
    with pytest.raises(RunError, match=r"no checkpoint in \S+ can be read \(step_0000004: .*\); move them away"):
        train(tiny(tmp_path))
    assert snapshot(run) == before


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model__args": "dim=64,depth=2,heads=2,dim_head=16"}, r"cannot continue as this one \(--model-args: dim 32"),
        ({"task__name": "mae"}, r"cannot continue as this one \(--model 'crate_demo' -> 'crate_mae_demo'.*--task 'cl"),
        ({"optim__lr": 1e-3}, r"was trained with another config \(--optim.lr 0.005 -> 0.001\)"),
    ],
)
def test_faults_other_run_in_the_folder_is_refused_before_anything_is_written(tmp_path, values, message):
    train(tiny(tmp_path, max_steps=4))
    before = snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        train(tiny(tmp_path, **values))
    assert snapshot(tmp_path / "run") == before


def test_faults_allowed_config_change_is_recorded(tmp_path):
    run = tmp_path / "run"
    train(tiny(tmp_path, max_steps=4))
    first = (run / "config.json").read_text()
    train(tiny(tmp_path, max_steps=6, optim__lr=1e-3, allow_config_change=True))
    train(tiny(tmp_path, max_steps=7, optim__lr=1e-3))  # compared with the latest config: no new change
    assert (run / "config.json").read_text() == first  # the config the run started with
    history = files.read_jsonl(run / "config_history.jsonl")
    assert len(history) == 1 and history[0]["step"] == 4
    assert history[0]["changed"] == {"optim.lr": [0.005, 0.001]} and history[0]["config"]["optim"]["lr"] == 1e-3


def test_faults_leftovers_of_a_kill_are_cleaned_at_start(tmp_path):
    run = tmp_path / "run"
    train(tiny(tmp_path, max_steps=4))
    (run / "metrics.jsonl.tmp").write_text('{"step": 1')
    (run / "checkpoints" / "step_0000006.tmp").mkdir()
    (run / "checkpoints" / "step_0000006.tmp" / "train.pt").write_bytes(b"partial")
    train(tiny(tmp_path, max_steps=5))
    assert not list(run.rglob("*.tmp"))


def test_faults_debug_shows_the_traceback(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text("[1, 2]")
    with pytest.raises(SystemExit):
        main(["--config", str(config)])
    err = capsys.readouterr().err
    assert err.startswith("crate-train: error: --config") and "top level must be an object" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="got a list"):
        main(["--config", str(config), "--debug"])
    assert json.loads(config.read_text()) == [1, 2]


@pytest.mark.parametrize(
    ("fault", "status", "line"),
    [
        (KeyboardInterrupt(), 130, "crate-measure: interrupted; files written before are whole"),
        (OSError(errno.ENOSPC, "No space left on device", "out/layerwise.png"), 1, "crate-measure: disk full"),
        (FileNotFoundError(errno.ENOENT, "No such file", "run/config.json"), 2, "crate-measure: error: "),
    ],
)
def test_faults_of_the_measuring_commands_are_one_line(monkeypatch, capsys, fault, status, line):
    """crate-measure and crate-segment share one ending: Ctrl-C, a full disk or a bad path is one line, no traceback."""
    from crate_kernels.train import measure_cli, segment_cli

    def stopped(args):
        raise fault

    monkeypatch.setattr(measure_cli, "_measure", stopped)
    assert measure_cli.main(["--model", "crate_demo"]) == status
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1
    monkeypatch.setattr(segment_cli, "_segment", stopped)
    assert segment_cli.main(["--checkpoint", "run"]) == status
    assert capsys.readouterr().err.startswith(line.replace("crate-measure", "crate-segment"))
