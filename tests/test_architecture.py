"""The layer rules of docs/architecture.md, checked by import-linter (contracts in pyproject.toml).

``lint-imports`` reads every import of the package, also those inside functions, so a lazy import
deep in a core module counts too. The planted-violation tests copy the package under another name,
add one offending import and check that the same contracts fail and name the offending line: a
contract that cannot fail would prove nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PLANT = "cxrplant"


def lint_imports(config: Path, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
               "sys.exit(lint_imports_command())", "--config", str(config), "--no-cache"]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_every_contract():
    result = lint_imports(PROJECT_ROOT / "pyproject.toml", PROJECT_ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_every_package_is_in_a_layer():
    """A new sub-package must be placed in the layer contract, or nothing checks what it imports."""
    contracts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c for c in contracts if c["type"] == "layers"]
    named = {name.strip() for layer in layers["layers"] for name in re.split(r"[|:]", layer)}
    package = PROJECT_ROOT / "cxrexp"
    shim = {"cxrexp.serving"}  # the legacy import path of logged models (see cxrexp/serving.py)
    present = {f"cxrexp.{p.name}" for p in package.iterdir() if (p / "__init__.py").exists()}
    present |= {f"cxrexp.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"} - shim
    assert present - named == set(), f"not in any layer of pyproject.toml: {sorted(present - named)}"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A copy of the package as ``cxrplant`` with the project's contracts, rewritten to that name."""
    root = tmp_path_factory.mktemp("planted")
    shutil.copytree(PROJECT_ROOT / "cxrexp", root / PLANT, ignore=shutil.ignore_patterns("__pycache__"))
    for path in (root / PLANT).rglob("*.py"):
        path.write_text(path.read_text().replace("cxrexp", PLANT))
    text = (PROJECT_ROOT / "pyproject.toml").read_text()
    section = text[text.index("[tool.importlinter]"):]
    (root / "pyproject.toml").write_text(section.replace("cxrexp", PLANT))

    def plant(module: str, line: str) -> subprocess.CompletedProcess:
        path = root / PLANT / (module.replace(".", "/") + ".py")
        original = path.read_text()
        path.write_text(original + "\n\n" + line + "\n")
        try:
            return lint_imports(root / "pyproject.toml", root, pythonpath=root)
        finally:
            path.write_text(original)

    return plant


@pytest.mark.parametrize(
    "module, line, broken, expected",
    [
        # a cycle: the decoder (bottom) importing a step (top)
        ("images.decode", f"from {PLANT}.steps import train_step", "Each package imports only the packages below it",
         f"{PLANT}.images.decode -> {PLANT}.steps.train_step"),
        # a lazy import inside a function counts as well
        ("evaluation.metrics", f"def _lazy():\n    from {PLANT}.mlflow_edge import tracking",
         "Each package imports only the packages below it", f"{PLANT}.evaluation.metrics -> {PLANT}.mlflow_edge.tracking"),
        # a step used as a library by another step
        ("steps.promote_step", f"from {PLANT}.steps import evaluate_step", "No step imports another",
         f"{PLANT}.steps.promote_step -> {PLANT}.steps.evaluate_step"),
        # MLflow in the pure core
        ("promotion", "import mlflow", "The pure core imports neither MLflow nor Optuna", f"{PLANT}.promotion -> mlflow"),
        # TensorFlow in a pure module other than the two allowed ones
        ("evaluation.audit", "import tensorflow", "TensorFlow/Keras only where",
         f"{PLANT}.evaluation.audit -> tensorflow"),
    ],
)
def test_a_planted_violation_fails_and_names_the_line(planted, module, line, broken, expected):
    result = planted(module, line)
    assert result.returncode != 0, result.stdout[-3000:]
    assert re.search(re.escape(broken) + r".*BROKEN", result.stdout), result.stdout[-3000:]
    assert expected in result.stdout, result.stdout[-3000:]


def test_the_unplanted_copy_keeps_every_contract(planted):
    """The copy itself is clean: the failures above come from the planted line alone."""
    result = planted("tags", "# nothing planted")
    assert result.returncode == 0, result.stdout[-3000:]
