"""Few-step CPU runs of the training loop (backend "torch": the Triton interpreter is far too slow for training)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crate_kernels
from crate_kernels.models import parse_model_args
from crate_kernels.train import checkpoint, run_folder
from crate_kernels.train.__main__ import main
from crate_kernels.train.config import ConfigError, from_flat
from crate_kernels.train.loop import train
from tests.train.helpers import make_image_folder

ROOT = Path(__file__).resolve().parents[2]
TINY_ARGS = {"dim": 32, "depth": 2, "heads": 2, "dim_head": 16}
TINY = {
    "steps": 8,
    "log_every": 1,
    "eval_every": 4,
    "ckpt_every": 4,
    "progress": False,
    "model.backend": "torch",
    "model.args": "dim=32,depth=2,heads=2,dim_head=16",
    "optim.batch_size": 16,
    "optim.warmup_steps": 2,
    "data.val_fraction": 0.05,
}


# DINO at test size: a small head, two local views, and the last layer trained from the start.
DINO = {"task.name": "dino", "task.dino_head": "32,16,24", "task.dino_local_crops": 2, "task.dino_freeze_last_layer": 0}
LFW = {"data.name": "lfw", "data.image_size": 8, "data.val_fraction": 0.8}  # 40 training images, 160 held out


def tiny(tmp_path: Path, **values) -> "crate_kernels.train.TrainConfig":
    return from_flat(TINY | {"out": str(tmp_path / "run")} | {k.replace("__", "."): v for k, v in values.items()})


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r}


def test_train_classify_outputs(tmp_path, capsys):
    result = train(tiny(tmp_path, max_steps=4))
    run = tmp_path / "run"
    assert set(losses(run)) == {1, 2, 3, 4}
    assert 0.0 <= result["eval_accuracy"] <= 1.0 and result["eval_loss"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"lr", "samples_per_s", "peak_mem_mb"} <= set(records[0])
    saved = json.loads((run / "config.json").read_text())["model"]
    assert saved["name"] == "crate_demo"  # with every argument, data-derived ones included:
    assert parse_model_args(saved["args"]) == TINY_ARGS | {
        "patch_size": 4,
        "image_size": 8,
        "channels": 1,
        "num_classes": 10,
    }
    assert (run / "metrics.png").stat().st_size > 0
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_0000004"]
    from safetensors.torch import load_file

    weights = load_file(run / "model.safetensors")
    model = crate_kernels.create_model("crate_demo", **parse_model_args(saved["args"]))
    model.load_state_dict(weights)
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "sparsity" in out


@pytest.mark.parametrize(
    ("task", "extra"),
    [
        ("mae", {"model__grad_checkpointing": True}),
        ("lm", {"precision": "bf16"}),  # CPU autocast
        ("mlm", {"optim__name": "lion", "optim__lr": 3e-4}),
        ("dino", {k.replace(".", "__"): v for k, v in (DINO | LFW).items() if k != "task.name"}),
    ],
)
def test_train_each_task(tmp_path, task, extra):
    args = "dim=32,depth=2,heads=2,dim_head=16" + (",block_size=32" if task in ("lm", "mlm") else "")
    result = train(tiny(tmp_path, task__name=task, model__args=args, max_steps=2, task__sample_tokens=20, **extra))
    run = tmp_path / "run"
    assert set(losses(run)) == {1, 2} and all(v > 0 for v in losses(run).values())
    assert result["eval_loss"] > 0
    artefact = {"mae": "reconstruction.png", "lm": "sample.txt", "mlm": "metrics.png", "dino": "metrics.png"}[task]
    assert (run / artefact).stat().st_size > 0
    if task == "dino":  # crate-measure reads the run's teacher backbone
        from crate_kernels.train.measure_cli import model_to_measure

        assert "teacher's backbone" in model_to_measure(None, "", str(run)).origin


# Per task, a run whose every random draw and schedule matters to its losses.
RESUMED = {
    "classify": {"data.crop_scale": 0.7, "data.hflip": True, "task.mixup": 0.4},
    # 40 training images: 2 steps an epoch, so the last layer's freeze ends and the teacher's temperature warms up
    # within the run; the teacher and its centre move every step.
    "dino": DINO | LFW | {"task.dino_freeze_last_layer": 1, "task.dino_teacher_temp_epochs": 2},
}


@pytest.mark.parametrize("task", RESUMED)
def test_train_resume_is_bit_exact(tmp_path, task):
    """Stopped at step 5 with its last checkpoint lost (a kill between checkpoints), resumed to 8: same losses."""
    noisy = {k.replace(".", "__"): v for k, v in RESUMED[task].items()} | {"ckpt_every": 2}
    noisy["model__args"] = TINY["model.args"] + ",dropout=0.1,emb_dropout=0.1"  # the torch RNG matters
    whole = train(tiny(tmp_path / "a", **noisy))
    train(tiny(tmp_path / "b", max_steps=5, **noisy))
    run = tmp_path / "b" / "run"
    last = checkpoint.checkpoints(run)
    assert [p.name for p in last] == ["step_0000004", "step_0000005"]
    shutil.rmtree(last[-1])  # killed after step 5 before its checkpoint: resumes from step 4
    resumed = train(tiny(tmp_path / "b", **noisy))
    assert losses(run) == losses(tmp_path / "a" / "run")  # exact float equality at every step
    assert resumed == whole


def test_train_image_folder_resumes_mid_epoch_bit_exact(tmp_path, image_folder, capsys):
    """An image folder of mixed sizes, modes and unreadable files, read in DataLoader workers with the paper's crop,
    flips, RandAugment and CutMix: stopped mid-epoch and resumed with another worker count, the same losses."""
    root, bad = image_folder
    images = {"data__name": str(root), "data__image_size": 8, "data__val_fraction": 0.25, "optim__batch_size": 6}
    images |= {"data__crop_scale": 0.08, "data__hflip": True, "data__randaugment": 2, "task__cutmix": 1.0}
    images |= {"steps": 7, "ckpt_every": 2, "eval_every": 7}  # 3 steps per epoch
    train(tiny(tmp_path / "a", data__workers=2, **images))
    named = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped an unreadable file: ")]
    train(tiny(tmp_path / "b", max_steps=4, data__workers=0, **images))
    shutil.rmtree(checkpoint.checkpoints(tmp_path / "b" / "run")[-1])  # resumes from step 2, mid-epoch 0
    train(tiny(tmp_path / "b", data__workers=1, **images))
    whole, resumed = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    assert whole == resumed and set(whole) == set(range(1, 8))
    last = json.loads((tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "eval_accuracy" in last and last["unreadable_files"] == len(named) == len(set(named)) >= 1
    assert {line.split(": ", 1)[1].split(" (")[0] for line in named} <= {str(p) for p in bad}


def test_train_resume_is_bit_exact_fp16(tmp_path, monkeypatch):
    """fp16 training moves the GradScaler's loss scale (halved, and the step skipped, on each overflow): a resumed
    run must continue with the scale it had, not a fresh one. A large initial scale makes the first steps overflow."""
    import functools

    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**19))
    fp16 = {"precision": "fp16", "ckpt_every": 2}
    train(tiny(tmp_path / "a", **fp16))
    train(tiny(tmp_path / "b", max_steps=2, **fp16))
    train(tiny(tmp_path / "b", **fp16))
    assert losses(tmp_path / "b" / "run") == losses(tmp_path / "a" / "run")


def test_train_crash_during_checkpoint_keeps_previous(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, max_steps=4)
    train(cfg)
    real_save = checkpoint._save_file

    def crash(obj, path):
        path.write_bytes(b"partial")  # a torn write, then the process dies
        raise KeyboardInterrupt("killed while writing a checkpoint")

    monkeypatch.setattr(checkpoint, "_save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(cfg, max_steps=0))
    run = tmp_path / "run"
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_0000004"]  # the .tmp dir is not a checkpoint
    assert (run / "checkpoints" / "step_0000008.tmp").is_dir()
    monkeypatch.setattr(checkpoint, "_save_file", real_save)
    train(dataclasses.replace(cfg, max_steps=0))  # resumes from step 4 and completes
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_0000004", "step_0000008"]
    assert set(losses(run)) == set(range(1, 9))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model.name": "crate_dmeo"}, "unknown model 'crate_dmeo'; did you mean crate_demo"),
        ({"data.name": "/no/such/images"}, "neither an embedded set"),
        ({"optim.batch_size": 16, "optim.grad_accum": 3}, "must be a multiple of world size 1"),
        ({"model.args": "dim=32,depht=2"}, "depht"),
        ({"model.args": "dim='wide'"}, "dim must be a positive int"),
        ({"optim.batch_size": 4096}, "larger than the training set"),
        ({"parallel": "ddp"}, "must run under torchrun"),
        ({"optim.batch_size": 15, "task.mixup": 0.2}, r"mix pairs of samples: the micro-batch \(15\) must be even"),
    ],
)
def test_train_bad_config_fails_before_training(tmp_path, values, message):
    cfg = from_flat(TINY | {"out": str(tmp_path / "run")} | values)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_train_cli_reports_bad_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--model", "nope", "--model.backend", "torch"])
    assert exit_info.value.code == 2
    assert "crate-train: error: --model: unknown model 'nope'" in capsys.readouterr().err


def test_train_default_backend_smoke(tmp_path):
    """One step with the default backend: under TRITON_INTERPRET=1 the models run the Triton kernels on CPU."""
    cfg = tiny(tmp_path, max_steps=1, model__backend="auto", model__args="dim=16,depth=1,heads=1,dim_head=16")
    result = train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_fraction=0.01)))
    assert result["eval_loss"] > 0


TEXT = {"model.args": TINY["model.args"] + ",block_size=32", "data.val_fraction": 0.005}
# An image folder of 50 training samples (step 2 is mid-epoch), with every per-sample draw on: crops, flips, Mixup.
FOLDER = {"data.image_size": 8, "data.val_fraction": 0.25, "data.crop_scale": 0.08, "data.hflip": True}
FOLDER |= {"task.mixup": 0.5, "data.workers": 0}
# run name -> its configuration beside TINY; every task, and classification on the image folder
RUNS = {
    "classify": {"task.name": "classify"},
    "mae": {"task.name": "mae"},
    "lm": {"task.name": "lm"} | TEXT,
    "mlm": {"task.name": "mlm"} | TEXT,
    "dino": DINO | LFW,  # 2 steps an epoch: the runs cross epochs
    "classify_folder": {"task.name": "classify"} | FOLDER,
}


def run_config(run: str, out: Path, images: Path, values: dict | None = None) -> dict:
    """The flat configuration of a 4-step run (evaluated at step 4) writing to ``out``."""
    data = {"data.name": str(images)} if run == "classify_folder" else {}
    return TINY | RUNS[run] | data | {"out": str(out), "max_steps": 4} | (values or {})


@pytest.fixture(scope="module")
def single_process_runs(tmp_path_factory) -> tuple[Path, Path]:
    """(the image folder, the runs' root): every run trained 4 steps in this process, the global batch of 16 as one
    micro-batch."""
    images, root = tmp_path_factory.mktemp("images"), tmp_path_factory.mktemp("single")
    make_image_folder(images, per_class=32)
    for run in RUNS:
        train(from_flat(run_config(run, root / run, images)))
    return images, root


def records(run_dir: Path) -> tuple[dict[int, float], dict[str, float]]:
    """(train loss per step, the held-out metrics of the last evaluation)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    held_out = [r for r in lines if "eval_loss" in r][-1]
    return losses(run_dir), {k: v for k, v in held_out.items() if k.startswith("eval_")}


# One xdist worker runs both (`--dist loadgroup`): two torchrun launches at once can race for the same free port.
@pytest.mark.xdist_group("torchrun")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_train_two_processes_match_one(single_process_runs, tmp_path, parallel):
    """torchrun, 2 gloo processes × 2 micro-batches of 4 (DINO: 1 of 8) = the single process's global batch of 16: the
    same train losses at every step and the same held-out metrics, for every task. One launch runs them all in turn.

    MAE and MLM check that each sample's random mask depends on neither the rank nor the micro-batch it lands in
    (held out: nor on the evaluation batch), MLM that its loss is the mean over the global batch's masked tokens;
    DINO that its views do not either, that the centre moves by the mean teacher score of the whole global batch,
    that the head's BatchNorm normalises by the statistics of both ranks' batches (and learns through them) and that
    the teacher follows the student (gathered from its shards under FSDP2); the image folder (DDP) that every
    sample's crop, flip and Mixup weight do not depend on them either. The FSDP2
    runs stop at step 2 and resume to 4 from their sharded checkpoints; the image-folder run resumes mid-epoch with
    another DataLoader worker count than the single process.
    """
    images, single_root = single_process_runs
    runs = [run for run in RUNS if parallel == "ddp" or run != "classify_folder"]
    configs = []
    for run in runs:
        for stop in (2, 4) if parallel == "fsdp2" or run == "classify_folder" else (4,):
            # DINO: one micro-batch of 8 a rank, so that the head's BatchNorm sees the global batch, as in one process
            values = {"parallel": parallel, "max_steps": stop, "optim.grad_accum": 1 if run == "dino" else 2}
            values |= {"data.workers": 1} if run == "classify_folder" and stop == 4 else {}
            configs.append(run_config(run, tmp_path / run, images, values))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "tests.train.run_configs", json.dumps(configs)]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for run in runs:
        (single, single_eval), (multi, multi_eval) = records(single_root / run), records(tmp_path / run)
        assert single.keys() == multi.keys() == {1, 2, 3, 4}, run
        for step in single:
            assert multi[step] == pytest.approx(single[step], rel=1e-5), (run, step)
        loose = {"eval_loss"} if run == "dino" else set()  # the head's BatchNorm in eval: see docs/design.md
        for name, value in single_eval.items():
            assert multi_eval[name] == pytest.approx(value, rel=1e-2 if name in loose else 1e-5), (run, name)
        assert multi_eval.keys() == single_eval.keys(), run
        written = {p.name for p in (checkpoint.checkpoints(tmp_path / run)[-1]).iterdir()}
        assert written >= {"train.pt", "rng_rank0.pt", "rng_rank1.pt"}
        assert ("model_optim" in written) == (parallel == "fsdp2")  # sharded (DCP) state only for FSDP2


@pytest.mark.xdist_group("torchrun")
def test_train_ranks_draw_their_own_dropout(tmp_path):
    """Every rank seeds alike for identical initial weights; after that each needs its own torch RNG stream, or
    all ranks apply the same dropout masks to their different samples. The saved RNG states show it."""
    flags = [f"--{k}={v}" for k, v in TINY.items() if k != "model.args"] + [f"--out={tmp_path}", "--max-steps=1"]
    flags += ["--model.args=dim=32,depth=2,heads=2,dim_head=16,dropout=0.1", "--export=false", "--eval-every=100"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "crate_kernels.train", "--parallel=ddp", *flags]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    last = checkpoint.checkpoints(tmp_path)[-1]
    states = [torch.load(last / f"rng_rank{r}.pt", weights_only=True)["torch"] for r in (0, 1)]
    assert not torch.equal(*states)


def test_train_default_run_reaches_97_5_percent(tmp_path, capsys):
    """The README's main job, `make train` (no flags): ≥ 97.5 % held-out accuracy on digits (98 % and more over three
    seeds), with the classical baselines and the per-layer reading beside it; ~25 s on 2 idle CPU cores.

    The backend is forced to "torch", which is what the default "auto" picks for CPU tensors outside the Triton
    interpreter (under TRITON_INTERPRET=1, as in CI, "auto" would interpret the kernels: far too slow to train). One
    thread: `make test` runs two workers on two cores, and two threads each would wait on each other's core.
    """
    from crate_kernels.train.config import parse_args

    flags = ["--out", str(tmp_path), "--progress", "false", "--model.backend", "torch", "--cpu-threads", "1"]
    result = train(parse_args(flags))
    assert result["eval_accuracy"] >= 0.975
    out = capsys.readouterr().out
    assert "RBF SVM" in out and "at initialisation it" in out and (tmp_path / "baselines.json").is_file()


def test_compare_trains_the_rival_first_with_the_same_recipe(tmp_path, capsys):
    """`make train`'s --task.compare vit_demo: the ViT trains in compare/vit_demo with the run's seed and model
    arguments, and its row joins the baselines; a rerun resumes both finished runs without training again."""
    from crate_kernels.train.config import parse_args

    flags = ["--out", str(tmp_path), "--progress", "false", "--model.backend", "torch", "--cpu-threads", "1"]
    flags += ["--steps", "4", "--eval-every", "4", "--task.compare", "vit_demo"]
    train(parse_args(flags))
    rival = tmp_path / "compare" / "vit_demo"
    assert "patch_size=4" in json.loads((rival / run_folder.CONFIG).read_text())["model"]["args"]
    rows = json.loads((tmp_path / "baselines.json").read_text())
    assert [r["model"] for r in rows[:2]] == ["crate_demo (this run)", "vit_demo (same recipe)"]
    assert rows[1]["accuracy"] == json.loads((rival / "baselines.json").read_text())[0]["accuracy"]
    assert "vit_demo (same recipe)" in capsys.readouterr().out
    train(parse_args(flags))
    assert "trained 0 steps" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"--task\.compare"):
        train(parse_args([*flags[:-2], "--task.compare", "vit_dmo"]))


def test_checkpoint_rng_states_survive_weights_only_load(tmp_path):
    import random

    import numpy as np

    path = tmp_path / "rng.pt"
    checkpoint._save_file(checkpoint.rng_state(), path)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    checkpoint.set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
