"""The CLI: flags generated from the configs, presets, booleans, user errors without tracebacks."""

from __future__ import annotations

import argparse

import pytest

from cxrexp.cli import build_parser, config_from_args, main, parse_bool
from cxrexp.config import PRESETS, PreprocessConfig, TrainConfig, apply_preset


@pytest.mark.parametrize(
    "text, expected",
    [("true", True), ("True", True), ("1", True), ("yes", True), ("false", False), ("0", False), ("", False)],
)
def test_parse_bool(text, expected):
    assert parse_bool(text) is expected


def test_parse_bool_rejects_other_words():
    with pytest.raises(argparse.ArgumentTypeError, match="maybe"):
        parse_bool("maybe")


def _train_cfg(argv):
    args = build_parser().parse_args(["train", *argv])
    cfg, changed = config_from_args(TrainConfig, args)
    return apply_preset(cfg, changed)


@pytest.mark.parametrize(
    "argv, field, expected",
    [
        ([], "filters", (16, 32, 64, 128)),
        (["--preset", "seed"], "filters", (32, 32, 64, 128, 256)),
        (["--preset", "seed"], "dense", (256, 128)),
        (["--preset", "seed"], "epochs", 25),
        # mlflow run passes every parameter at its default: the preset must still apply
        (["--preset", "seed", "--epochs", "15", "--filters", "16,32,64,128"], "filters", (32, 32, 64, 128, 256)),
        # a value other than the default wins over the preset
        (["--preset", "seed", "--epochs", "3"], "epochs", 3),
        (["--preset", "seed", "--filters", "8,16"], "filters", (8, 16)),
    ],
)
def test_presets_fill_defaults_only(argv, field, expected):
    assert getattr(_train_cfg(argv), field) == expected


def test_seed_preset_matches_the_published_experiment():
    seed = PRESETS["seed"]
    assert seed["filters"] == (32, 32, 64, 128, 256) and seed["dense"] == (256, 128)
    assert seed["dropout"] == 0.2 and seed["class_weight"] == "inverse" and seed["patience"] == 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["preprocess", "--positive-class", "Pneumonia"], "positive_class='Pneumonia' is not among"),
        (["preprocess", "--val-frac", "0.6", "--test-frac", "0.5"], "sum below 1"),
        (["train", "--class-weight", "heavy"], "class_weight='heavy'"),
        (["train", "--preset", "huge"], "preset='huge'"),
    ],
)
def test_bad_flags_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_every_config_field_is_a_flag():
    parser = build_parser()
    args = parser.parse_args(["preprocess", "--data-dir", "x", "--classes", "COVID,Viral Pneumonia",
                              "--positive-class", "COVID", "--image-size", "64"])
    cfg, _ = config_from_args(PreprocessConfig, args)
    assert cfg.classes == ("COVID", "Viral Pneumonia") and cfg.image.image_size == 64 and cfg.data_dir == "x"


# TensorFlow's C++ start-up lines as TensorFlow 2.21 prints them on a CPU-only machine.
TF_STARTUP_LINES = ("oneDNN custom operations", "cudart_stub", "absl::InitializeLog")


@pytest.mark.parametrize(
    "flags, environ, shown",
    [
        ([], {}, False),  # the default: a step's console starts with cxrexp's own lines
        (["--tf-logs"], {}, True),
        ([], {"CXREXP_TF_LOGS": "1"}, True),  # how `mlflow run` brings them back
    ],
)
def test_tensorflows_start_up_logs_are_hidden_unless_asked_for(tmp_path, flags, environ, shown):
    """A command that loads TensorFlow and then fails on a model URI: its error must still be shown."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "CXREXP_TF_LOGS")}
    env.update(environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    done = subprocess.run([sys.executable, "-m", "cxrexp.cli", *flags, "predict", "--model", "models:/nothing-here/1",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "nothing-here" in done.stderr  # cxrexp's own error still reaches the console
    assert any(line in done.stderr for line in TF_STARTUP_LINES) == shown, done.stderr[-2000:]


@pytest.mark.parametrize(
    "flag, environ, expected",
    [
        ("", {}, "cxrexp"),  # runs are grouped, not left in MLflow's Default experiment
        ("chest-team", {}, "chest-team"),
        ("", {"MLFLOW_EXPERIMENT_NAME": "theirs"}, None),  # MLflow's own variable is honoured by MLflow
        ("", {"MLFLOW_EXPERIMENT_ID": "7"}, None),
        ("chest-team", {"MLFLOW_EXPERIMENT_NAME": "theirs"}, "chest-team"),  # the flag is the more specific
        ("chest-team", {"MLFLOW_RUN_ID": "abc"}, None),  # under `mlflow run` the run exists already
    ],
)
def test_the_experiment_a_step_logs_into(flag, environ, expected):
    from cxrexp.cli import experiment_for

    assert experiment_for(flag, environ) == expected


def test_a_step_started_by_cxrexp_logs_into_the_cxrexp_experiment_with_a_name_that_says_what_ran(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    assert main(["preprocess", "--out-dir", str(tmp_path / "prepared"), "--synthetic-count", "40", "--image-size",
                 "32", "--synthetic-size", "64", "--workers", "1", "--lungs", "none"]) == 0
    try:
        experiment = mlflow.get_experiment_by_name("cxrexp")
        (run,) = mlflow.search_runs([experiment.experiment_id], output_format="list")
        assert run.info.run_name == "preprocess synthetic 32px clahe lungs=none"
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("argv, needs", [
    (["preprocess"], True),  # no --lungs: the default view, a lung crop, needs the segmenter (TensorFlow)
    (["preprocess", "--lungs", "crop"], True),
    (["preprocess", "--lungs", "mask"], True),
    (["preprocess", "--lungs", "none"], False),
    (["promote"], False),
    (["train"], True),
])
def test_which_commands_preload_tensorflow(argv, needs):
    from cxrexp.cli import _needs_tensorflow

    assert _needs_tensorflow(build_parser().parse_args(argv)) is needs
