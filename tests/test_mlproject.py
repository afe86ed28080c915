"""MLproject parameters, CLI flags and config fields are one set of names."""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from cxrexp.config import (
    EvaluateConfig,
    MainConfig,
    PreprocessConfig,
    PromoteConfig,
    SegmentConfig,
    TrainConfig,
    field_names,
    flat_fields,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STEPS = {"preprocess": PreprocessConfig, "train": TrainConfig, "evaluate": EvaluateConfig, "promote": PromoteConfig,
         "segment": SegmentConfig, "main": MainConfig}


@pytest.fixture(scope="module")
def entry_points() -> dict:
    project = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())
    return project["entry_points"]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("step", sorted(STEPS))
def test_parameters_are_the_config_fields(entry_points, step):
    parameters = entry_points[step]["parameters"]
    fields = field_names(STEPS[step])
    assert sorted(parameters) == sorted(fields), (
        f"MLproject {step}: missing {sorted(set(fields) - set(parameters))}, "
        f"extra {sorted(set(parameters) - set(fields))}"
    )


@pytest.mark.parametrize("step", sorted(STEPS))
def test_command_passes_each_parameter_as_its_flag(entry_points, step):
    command = entry_points[step]["command"]
    assert command.startswith(f"python entrypoints/{step}.py ")
    for name in field_names(STEPS[step]):
        assert f"{flag(name)} {{{name}}}" in command, f"{step}: command lacks `{flag(name)} {{{name}}}`"
    passed = re.findall(r"(--[a-z0-9-]+) \{([a-z0-9_]+)\}", command)
    assert all(f == flag(n) for f, n in passed)  # no flag carries another parameter's value
    assert len(passed) == len(field_names(STEPS[step])) == len(re.findall(r"--[a-z]", command))


def _same_default(mlproject_value, config_value) -> bool:
    if isinstance(config_value, tuple):
        return str(mlproject_value).replace(" ", "") == ",".join(map(str, config_value))
    if isinstance(config_value, bool):
        return str(mlproject_value).lower() == str(config_value).lower()
    if isinstance(config_value, float):
        return math.isclose(float(mlproject_value), config_value, rel_tol=1e-12)
    return str(mlproject_value) == str(config_value)


@pytest.mark.parametrize("step", sorted(STEPS))
def test_defaults_agree(entry_points, step):
    parameters = entry_points[step]["parameters"]
    defaults = dict(flat_fields(STEPS[step]))
    differ = {
        name: (spec.get("default"), defaults[name])
        for name, spec in parameters.items()
        if name in defaults and not _same_default(spec.get("default"), defaults[name])
    }
    assert not differ, f"MLproject {step} defaults differ from {STEPS[step].__name__} (MLproject, config): {differ}"


@pytest.mark.parametrize("step", sorted(STEPS))
def test_help_lists_every_flag(step):
    command = {"main": "run"}.get(step, step)  # `cxrexp run` is the main entry point
    out = subprocess.run(["cxrexp", command, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    listed = set(re.findall(r"--[a-z0-9-]+", out))
    missing = [flag(name) for name in field_names(STEPS[step]) if flag(name) not in listed]
    assert not missing, f"`cxrexp {step} --help` does not list {missing}"


def test_conda_env_installs_what_pyproject_declares():
    # `mlflow run .` without --env-manager local builds its environment from conda.yaml alone, so
    # a dependency added to pyproject.toml but not there would only fail on a user's machine.
    import tomllib

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((PROJECT_ROOT / "conda.yaml").read_text())
    pip_lists = [d["pip"] for d in conda["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "conda.yaml needs exactly one pip: list"
    declared = project["dependencies"] + project["optional-dependencies"]["postgres"]
    assert sorted(pip_lists[0]) == sorted(declared)
    (python,) = [d for d in conda["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    major, minor = python.split("=")[1].split(".")[:2]
    lowest = project["requires-python"].removeprefix(">=").split(".")
    assert (int(major), int(minor)) >= (int(lowest[0]), int(lowest[1]))
