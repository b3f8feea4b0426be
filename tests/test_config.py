"""Unit tests of shared/config.py: defaults < YAML < CLI, and every user mistake named precisely."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

from shared.doctor import load_recipe  # noqa: E402
from shared.config import ConfigError, build_parser, load_yaml, parse_config, save_yaml, to_dict  # noqa: E402



@pytest.fixture(scope="module")
def Config():
    return load_recipe("image_classification").Config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def exit_message(capsys, func, *args) -> str:
    """Run a parse that must end in argparse's usage error; return its stderr."""
    with pytest.raises(SystemExit) as info:
        func(*args)
    assert info.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------- precedence


def test_defaults_when_nothing_given(Config):
    cfg = parse_config(Config, [])
    assert cfg == Config()
    assert cfg.batch_size == 128 and cfg.lr == 0.05 and cfg.dataset == "fashion-mnist"


def test_defaults_then_yaml_then_cli(Config, tmp_path):
    path = write(tmp_path / "r.yaml", "batch_size: 64\nlr: 0.1\nepochs: 5\n")
    cfg = parse_config(Config, ["-c", str(path), "--lr", "0.2"])
    assert cfg.batch_size == 64  # YAML over default
    assert cfg.epochs == 5  # YAML over default
    assert cfg.lr == 0.2  # CLI over YAML
    assert cfg.momentum == 0.9  # default, untouched
    # a CLI value equal to the default still overrides the YAML
    cfg = parse_config(Config, ["--config", str(path), "--batch-size", "128"])
    assert cfg.batch_size == 128 and cfg.lr == 0.1


def test_yaml_accepts_dashed_keys_and_empty_file(Config, tmp_path):
    assert load_yaml(write(tmp_path / "a.yaml", "batch-size: 32\n"), Config) == {"batch_size": 32}
    assert load_yaml(write(tmp_path / "empty.yaml", ""), Config) == {}


# --------------------------------------------------------------------------- unknown keys and flags


def test_unknown_yaml_key_names_file_key_and_closest(Config, tmp_path):
    path = write(tmp_path / "bad.yaml", "batch_size: 64\nbach_size: 64\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path, Config)
    assert str(info.value) == f"{path}: unknown key 'bach_size' (did you mean 'batch_size'?)"


def test_unknown_yaml_key_without_close_match_has_no_suggestion(Config, tmp_path):
    path = write(tmp_path / "bad.yaml", "zzzzqqq: 1\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path, Config)
    assert str(info.value) == f"{path}: unknown key 'zzzzqqq'"


def test_parse_config_reports_yaml_mistake_as_usage_error(Config, tmp_path, capsys):
    path = write(tmp_path / "bad.yaml", "bach_size: 64\n")
    err = exit_message(capsys, parse_config, Config, ["-c", str(path)])
    assert f"{path}: unknown key 'bach_size' (did you mean 'batch_size'?)" in err


def test_missing_or_non_mapping_yaml(Config, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_yaml(tmp_path / "nope.yaml", Config)
    assert str(info.value) == f"recipe config {tmp_path / 'nope.yaml'} does not exist"
    path = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path, Config)
    assert str(info.value) == f"{path}: expected a mapping of option names to values"


@pytest.mark.parametrize("argv", [["--bach-size", "5"], ["--bach-size=5"]])
def test_unknown_cli_flag_suggests_closest(Config, capsys, argv):
    err = exit_message(capsys, parse_config, Config, argv)
    assert "error: unknown option '" + argv[0] + "' (did you mean '--batch-size'?)" in err


def test_abbreviated_cli_flag_is_not_accepted(Config, capsys):
    err = exit_message(capsys, parse_config, Config, ["--epoch", "2"])
    assert "unknown option '--epoch' (did you mean '--epochs'?)" in err


def test_cli_choice_is_checked(Config, capsys):
    err = exit_message(capsys, parse_config, Config, ["--dataset", "mnist"])
    assert "argument --dataset: invalid choice: 'mnist'" in err


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize("text, message", [
    ("lr: fast", "key 'lr' must be float, got 'fast'"),
    ("batch_size: 12.5", "key 'batch_size' must be int, got 12.5"),
    ("batch_size: true", "key 'batch_size' must be int, got True"),
    ("batch_size: '64'", "key 'batch_size' must be int, got '64'"),
    ("pretrained: 1", "key 'pretrained' must be true or false, got 1"),
    ("pretrained: 'yes'", "key 'pretrained' must be true or false, got 'yes'"),
    ("model: 18", "key 'model' must be str, got 18"),
    ("epochs: null", "key 'epochs' may not be null"),
    ("synthetic_shape: [3, x]", "key 'synthetic_shape' must be int, got 'x'"),
])
def test_yaml_wrong_type_is_named(Config, tmp_path, text, message):
    path = write(tmp_path / "t.yaml", text + "\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path, Config)
    assert str(info.value) == f"{path}: {message}"


def test_yaml_values_are_coerced(Config, tmp_path):
    path = write(tmp_path / "ok.yaml", "lr: 1\ndata_dir: null\nnum_classes: null\npretrained: false\n"
                                        "synthetic_shape: [3, 32]\nweight_decay: 5.0e-4\n")
    values = load_yaml(path, Config)
    assert values == {"lr": 1.0, "data_dir": None, "num_classes": None, "pretrained": False,
                      "synthetic_shape": [3, 32], "weight_decay": 5e-4}
    assert type(values["lr"]) is float


def test_yaml_float_in_exponent_notation(Config, tmp_path):
    values = load_yaml(write(tmp_path / "e.yaml", "lr: 1e-3\nweight_decay: 5e-4\n"), Config)
    assert values == {"lr": 1e-3, "weight_decay": 5e-4}


def test_yaml_choice_is_checked(Config, tmp_path):
    path = write(tmp_path / "c.yaml", "dataset: mnist\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path, Config)
    message = str(info.value)
    assert str(path) in message and "dataset" in message and "'mnist'" in message
    assert "fashion-mnist" in message  # names the valid choices


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("True", True), ("yes", True), ("1", True), ("ON", True),
    ("false", False), ("FALSE", False), ("no", False), ("0", False), ("off", False),
])
def test_cli_bool_parsing(Config, text, expected):
    assert parse_config(Config, ["--pretrained", text]).pretrained is expected


def test_cli_bad_bool(Config, capsys):
    err = exit_message(capsys, parse_config, Config, ["--pretrained", "maybe"])
    assert "argument --pretrained: expected true/false, got 'maybe'" in err


def test_cli_nullable_and_typed_values(Config, capsys):
    cfg = parse_config(Config, ["--data-dir", "none", "--num-classes", "null", "--train-subset", "7",
                                "--lr", "3e-4"])
    assert cfg.data_dir is None and cfg.num_classes is None and cfg.train_subset == 7
    assert cfg.lr == pytest.approx(3e-4)
    assert parse_config(Config, ["--data-dir", "/x/y"]).data_dir == "/x/y"
    err = exit_message(capsys, parse_config, Config, ["--num-classes", "five"])
    assert "argument --num-classes: invalid int value: 'five'" in err


def test_list_option(Config, tmp_path, capsys):
    assert parse_config(Config, ["--synthetic-shape", "3", "32"]).synthetic_shape == [3, 32]
    assert parse_config(Config, ["-c", str(write(tmp_path / "s.yaml", "synthetic_shape: [3, 16]\n"))]) \
        .synthetic_shape == [3, 16]
    # a scalar in YAML becomes a one-element list, which the recipe then rejects
    assert load_yaml(write(tmp_path / "one.yaml", "synthetic_shape: 3\n"), Config) == {"synthetic_shape": [3]}
    err = exit_message(capsys, parse_config, Config, ["--synthetic-shape", "3"])
    assert "synthetic_shape is 'channels size', got [3]" in err
    # the default list is not shared between instances
    a, b = Config(), Config()
    a.synthetic_shape.append(9)
    assert b.synthetic_shape == [1, 28]


# --------------------------------------------------------------------------- recipe validation


@pytest.mark.parametrize("kwargs, message", [
    (dict(imbalance=0.0), "imbalance must be in (0, 1], got 0.0"),
    (dict(imbalance=1.5), "imbalance must be in (0, 1], got 1.5"),
    (dict(epochs=0), "epochs must be at least 1, got 0"),
    (dict(batch_size=0), "batch_size must be at least 1, got 0"),
    (dict(grad_accum_steps=0), "grad_accum_steps must be at least 1, got 0"),
    (dict(synthetic_shape=[1, 28, 28]), "synthetic_shape is 'channels size', got [1, 28, 28]"),
    (dict(class_weights="balanced", mixup=0.2),
     "class_weights cannot be combined with mixup/cutmix (soft targets have no class weights)"),
    (dict(class_weights="w.txt", cutmix=1.0),
     "class_weights cannot be combined with mixup/cutmix (soft targets have no class weights)"),
])
def test_recipe_post_init_validation(Config, kwargs, message):
    with pytest.raises(ConfigError) as info:
        Config(**kwargs)
    assert str(info.value) == message


def test_negative_eval_batch_size_is_refused(Config):
    with pytest.raises(ConfigError) as info:
        Config(eval_batch_size=-1)
    assert "eval_batch_size" in str(info.value)


def test_recipe_validation_reaches_the_command_line(Config, capsys):
    err = exit_message(capsys, parse_config, Config, ["--imbalance", "0"])
    assert "error: imbalance must be in (0, 1], got 0.0" in err
    err = exit_message(capsys, parse_config, Config, ["--class-weights", "balanced", "--mixup", "0.2"])
    assert "class_weights cannot be combined with mixup/cutmix" in err


def test_valid_edge_values_pass(Config):
    assert Config(imbalance=1.0).imbalance == 1.0
    assert Config(imbalance=0.01, class_weights="balanced").class_weights == "balanced"


# --------------------------------------------------------------------------- saving and help


def test_save_yaml_round_trip(Config, tmp_path):
    cfg = Config(dataset="synthetic", data_dir="/d", num_classes=5, lr=3e-4, pretrained=True,
                 synthetic_shape=[3, 16], run_name=None, imbalance=0.25, weight_decay=5e-4)
    path = tmp_path / "config.yaml"
    save_yaml(cfg, path)
    back = Config(**load_yaml(path, Config))
    assert back == cfg
    assert parse_config(Config, ["-c", str(path)]) == cfg
    assert list(to_dict(cfg)) == [f.name for f in dataclasses.fields(Config)]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes" / "configs").glob("*.yaml")))
def test_shipped_recipe_yaml_loads(Config, name):
    path = ROOT / "recipes" / "configs" / name
    cfg = parse_config(Config, ["-c", str(path)])
    assert to_dict(cfg) == {**to_dict(Config()), **load_yaml(path, Config)}


def test_help_shows_defaults(Config):
    text = " ".join(build_parser(Config, "").format_help().split())

    def help_of(flag):  # the text after the option's own line, up to the next option
        return text.split(f" {flag} ", 1)[1].split(" --", 1)[0]

    assert "default" in help_of("--batch-size BATCH_SIZE") and "128" in help_of("--batch-size BATCH_SIZE")
    assert "default" in help_of("--lr LR") and "0.05" in help_of("--lr LR")
    assert "default" in help_of("--model MODEL") and "small_cnn" in help_of("--model MODEL")


def test_recipe_help_lists_every_field(Config):
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "image_classification.py"), "--help"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    flags = set(proc.stdout.split())
    missing = [f.name for f in dataclasses.fields(Config)
               if "--" + f.name.replace("_", "-") not in flags]
    assert missing == []
    for group in ("data:", "model:", "optimisation:", "run:"):
        assert group in flags
    assert "-c" in proc.stdout and "--config" in proc.stdout
