"""``crate-segment`` end to end on a tiny crate-train run on ``shapes`` (supervised, DINO), and its one-line errors."""

import json

import pytest

import crate_kernels
from crate_kernels.train import shapes
from crate_kernels.train.config import parse_args
from crate_kernels.train.loop import train
from crate_kernels.train.segment_cli import main


@pytest.fixture(autouse=True)
def _small_shapes(monkeypatch):
    crate_kernels.set_backend("torch")  # the CLI's plumbing is under test here, not the kernels
    monkeypatch.setattr(shapes, "COUNT", 40)


DINO = "--task dino --task.dino_head 32,8,16 --task.dino_local_crops 1"  # small head, one local view


@pytest.mark.parametrize(
    ("model", "task"), [("crate_demo", ""), ("vit_demo", ""), ("crate_demo", DINO)], ids=["crate", "vit", "crate-dino"]
)
def test_segment_cli_scores_a_tiny_run(tmp_path, capsys, model, task):
    run = tmp_path / "run"
    flags = f"--model {model} --model-args depth=1,patch_size=4 --model.backend torch --data shapes --steps 2 {task}"
    train(
        parse_args(
            [
                *flags.split(),
                "--data.image_size",
                "16",
                "--optim.batch_size",
                "8",
                "--out",
                str(run),
                "--progress",
                "false",
            ]
        )
    )
    out = tmp_path / "seg"
    assert (
        main(["--checkpoint", str(run), "--out", str(out), "--batch-size", "4", "--overlays", "2", "--progress", "0"])
        == 0
    )
    report = json.loads((out / "segmentation.json").read_text())
    assert report["model"] == model and report["images"] == 8
    if task:  # the teacher's backbone: no classifier, no accuracy
        assert "accuracy" not in report and "teacher's backbone" in report["origin"]
    else:
        assert 0 <= report["accuracy"] <= 1
    for method in ("attention", "maskcut"):
        assert 0 <= report[method]["miou"] <= 1 and 0 <= report[method]["corloc"] <= 1
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["batch_000.png", "batch_001.png"]
    assert len(report["attention_miou_per_head"]) == 4 and "mIoU" in capsys.readouterr().out


def test_segment_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["--model", "crate_demo", "--data", "digits", "--out", str(tmp_path)]) == 2
    assert "crate-segment: error: --data digits: no object masks" in capsys.readouterr().err
    assert main(["--model", "crate_demo", "--data", "shapes", "--out", str(tmp_path)]) == 2
    assert "the model takes (1, 8, 8)" in capsys.readouterr().err
