"""``crate-measure``: the table and files it writes, the model it picks, and its one-line errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

import crate_kernels
from crate_kernels.train.config import DataConfig
from crate_kernels.train.data import encode_text
from crate_kernels.train.measure_cli import load_inputs, main


@pytest.fixture(autouse=True)
def _torch_backend():
    crate_kernels.set_backend("torch")  # the CLI's plumbing is under test here, not the kernels


def _run_folder(path, name="crate_demo", args="depth=2,dim_head=8", data=None):
    """A run folder as crate-train leaves it: the resolved config.json and the exported model.safetensors."""
    model = crate_kernels.create_model(name, **crate_kernels.models.parse_model_args(args))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    config = {"model": {"name": name, "args": args}, "steps": 10} | ({"data": data} if data else {})
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_cli_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    saved = tmp_path / "saved"
    crate_kernels.save_pretrained(crate_kernels.create_model("crate_demo", depth=3), saved)
    out = tmp_path / "out"
    args = ["--checkpoint", str(saved), "--out", str(out), "--batch-size", "16", "--attention"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "crate_demo from" in printed and "R^c (↓)" in printed and "16 held-out samples of digits" in printed
    table = [line.split() for line in printed.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 4]
    assert [int(t[0]) for t in table] == [1, 2, 3]
    report = json.loads((out / "layerwise.json").read_text())
    assert report["model"] == "crate_demo" and [r["layer"] for r in report["rows"]] == [1, 2, 3]
    for name in ("layerwise.png", "attention.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["--model", "crate_nope", "--out", str(tmp_path)]) == 2
    assert "crate-measure: error: unknown model name 'crate_nope'" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "missing.npy"), "--out", str(tmp_path)]) == 2
    assert "missing.npy' is neither an embedded set" in capsys.readouterr().err
    assert main(["--model-args", "depht=2", "--out", str(tmp_path)]) == 2
    assert "takes no argument(s) ['depht']" in capsys.readouterr().err


def test_cli_reads_a_crate_train_run_folder_and_its_data(tmp_path, capsys):
    run = _run_folder(tmp_path, data={"name": "lfw", "val_fraction": 0.25})
    assert main(["--checkpoint", str(run), "--out", str(tmp_path / "m"), "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "crate_demo from" in printed and "8 held-out samples of lfw of shape (1, 8, 8)" in printed
    assert len(json.loads((tmp_path / "m" / "layerwise.json").read_text())["rows"]) == 2


def test_a_folder_names_its_model_and_contradictions_are_refused(tmp_path, capsys):
    run = _run_folder(tmp_path)
    out = ["--out", str(tmp_path / "m"), "--batch-size", "4"]
    assert main(["--checkpoint", str(run), "--model", "crate_demo", "--model-args", "depth=2", *out]) == 0
    capsys.readouterr()
    assert main(["--checkpoint", str(run), "--model", "crate_alpha_demo", *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model crate_alpha_demo:" in err and "holds a crate_demo" in err
    assert main(["--checkpoint", str(run), "--model-args", "depth=3", *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model-args:" in err and "depth=2" in err


def test_model_args_shape_the_model_of_an_official_checkpoint(tmp_path, capsys):
    """An official checkpoint file fine-tuned to 3 classes loads into --model with --model-args num_classes=3; the
    report carries the model's name."""
    model = crate_kernels.create_model("crate_alpha_demo", num_classes=3, depth=2)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ft.pth")
    args = ["--checkpoint", str(tmp_path / "ft.pth"), "--model", "crate_alpha_demo", "--out", str(tmp_path / "m")]
    assert main([*args, "--model-args", "num_classes=3,depth=2", "--batch-size", "4"]) == 0
    assert json.loads((tmp_path / "m" / "layerwise.json").read_text())["model"] == "crate_alpha_demo"
    capsys.readouterr()
    assert main([*args, "--batch-size", "4"]) == 2  # without them the checkpoint does not fit
    assert "does not fit CRATEAlpha" in capsys.readouterr().err


def test_text_is_encoded_as_training_encodes_it(tmp_path):
    """Non-ASCII characters become '?' as in training (dropping them would shift every window)."""
    text = "Größe café naïve — 12 ünits " * 40
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    model = crate_kernels.create_model("crate_lm_demo", block_size=16)
    x = load_inputs(model, DataConfig(name=str(tmp_path / "t.txt"), val_fraction=0.5), batch_size=64)
    ids = encode_text(text)
    held_out = ids[ids.numel() - round(ids.numel() * 0.5) :]
    windows = {tuple(held_out[i * 16 : i * 16 + 16].tolist()) for i in range((held_out.numel() - 1) // 16)}
    assert x.shape[1] == 16 and (x == ord("?")).any()
    assert {tuple(row.tolist()) for row in x} <= windows
