import json

import pytest

from crate_kernels.models import parse_model_args
from crate_kernels.train.config import ConfigError, TrainConfig, from_flat, parse_args


def test_config_defaults_are_the_digits_demo():
    cfg = parse_args([])
    assert (cfg.task.name, cfg.model.name, cfg.data.name, cfg.parallel) == ("classify", "crate_demo", "digits", "none")
    assert cfg.last_step == cfg.steps


def test_config_task_picks_its_demo_model_and_data():
    cfg = parse_args(["--task", "lm"])
    assert (cfg.model.name, cfg.data.name) == ("crate_lm_demo", "pydoc")
    assert parse_args(["--task", "mae"]).model.name == "crate_mae_demo"


def test_config_flags_aliases_and_types():
    argv = ["--out", "x", "--max-steps", "7", "--model", "crate_demo", "--model-args", "dim=32,pool='mean'"]
    argv += ["--optim.lr", "1e-4", "--optim.betas", "0.8,0.9", "--data.hflip", "true", "--parallel", "ddp"]
    cfg = parse_args(argv)
    assert (cfg.out, cfg.max_steps, cfg.optim.lr, cfg.optim.betas, cfg.data.hflip) == ("x", 7, 1e-4, (0.8, 0.9), True)
    assert parse_model_args(cfg.model.args) == {"dim": 32, "pool": "mean"}
    assert parse_model_args("image_size=(8, 16), pool=mean, ista=0.2") == {
        "image_size": (8, 16),
        "pool": "mean",
        "ista": 0.2,
    }
    assert parse_args(["--max_steps", "3"]).max_steps == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optim.lr", "fast"], "optim.lr: expected float"),
        (["--steps", "1.5"], "steps: expected int"),
        (["--data.hflip", "maybe"], "expected true/false"),
        (["--optim.betas", "0.9"], "expected 2 comma-separated"),
        (["--task", "segment"], "--task must be one of"),
        (["--parallel", "zero"], "--parallel must be one of"),
        (["--optim.batch_size", "0"], "--optim.batch_size must be >= 1"),
        (["--model-args", "dim"], "expected name=value pairs"),
        (["--model-args", "dim=64,dim=32"], "dim given twice"),
        (["--model-args", "dim=f(1)"], "must be a Python literal"),
        (["--task", "mae", "--task.mask_ratio", "0"], "mask_ratio must be in"),  # the MAE loss needs masked patches
    ],
)
def test_config_rejects_bad_values(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_config_unknown_flag_exits():
    with pytest.raises(SystemExit):
        parse_args(["--optim.learning_rate", "1"])


def test_config_files_toml_and_json(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 50\n[optim]\nname = "lion"\nlr = 1\n[model]\nargs = "depth=2"\n')
    cfg = parse_args(["--config", str(toml), "--optim.lr", "2e-4"])  # the flag wins over the file; args over the demo's
    assert (cfg.steps, cfg.optim.name, cfg.optim.lr, cfg.model.args) == (50, "lion", 2e-4, "patch_size=4,depth=2")
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(cfg.to_dict()))
    assert parse_args(["--config", str(saved)]) == cfg  # a run's saved config.json reproduces it
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.learning_rate'"):
        parse_args(["--config", str(bad)])
    with pytest.raises(TypeError, match=r"optim\.warmup_steps: expected int, got float"):
        from_flat({"optim.warmup_steps": 1.5}, TrainConfig())


def test_config_help_documents_every_flag_and_its_choices(capsys):
    from crate_kernels.train.config import CHOICES, FIELD_DOCS, LEAVES, build_parser

    assert set(FIELD_DOCS) == set(LEAVES) and all(FIELD_DOCS.values())  # a new field needs its trailing comment
    text = " ".join(build_parser().format_help().split())
    for key, doc in FIELD_DOCS.items():
        assert " ".join(doc.split()) in text, key
    for key, allowed in CHOICES.items():
        assert "{" + ",".join(allowed) + "}" in text, key
    assert "crate_demo, crate_lm_demo" not in text and "crate_demo," in text  # --model lists the registry


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optim.lrr", "1"], "unknown flag --optim.lrr; did you mean --optim.lr"),
        (["--stepz=3"], "unknown flag --stepz; did you mean --steps"),
        (["--optim.learning_rate", "1"], "unknown flag --optim.learning-rate; --optim.* flags: --optim.batch-size,"),
        (["--data.zzz", "1"], "unknown flag --data.zzz; --data.* flags: --data.block-size, --data.crop-scale"),
    ],
)
def test_config_mistyped_flag_says_what_it_meant(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_config_choice_says_what_it_meant():
    with pytest.raises(ConfigError, match=r"--precision must be one of auto, fp32, bf16, fp16; got 'bf61'; did you"):
        parse_args(["--precision", "bf61"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", r"run.json'?: the top level must be an object of config values .* got a list"),
        ('"steps"', "got a str"),
        ('{"steps": 5,}', r"run.json'?: not valid JSON"),
    ],
)
def test_config_json_file_that_is_not_an_object(tmp_path, text, message):
    path = tmp_path / "run.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(path)])
