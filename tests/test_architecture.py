"""The layering docs/architecture.md promises: MLflow and Optuna only at the edges.

Imports are read from the source (every ``import``, also those inside functions), so a lazy import
deep in a core module counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cxrexp"

# Where each library may be imported (paths relative to cxrexp/, folders end with "/").
ALLOWED = {
    "optuna": ("tuning/",),
    "mlflow": (
        "tuning/", "steps/", "tracking.py", "registry.py", "serving.py", "epoch_logging.py",
    ),
}


def imported_top_levels(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def modules() -> list[str]:
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))


def allowed(module: str, library: str) -> bool:
    return any(module == place or (place.endswith("/") and module.startswith(place)) for place in ALLOWED[library])


@pytest.mark.parametrize("library", sorted(ALLOWED))
def test_library_is_imported_only_at_its_edges(library):
    offenders = [m for m in modules() if library in imported_top_levels(PACKAGE / m) and not allowed(m, library)]
    assert offenders == [], f"{library} imported outside {ALLOWED[library]}: {offenders}"


@pytest.mark.parametrize(
    "module, library, expected",
    [
        ("tuning/space.py", "optuna", True),
        ("tuning.py", "optuna", False),  # a prefix match without the folder's slash is not inside it
        ("tracking.py", "optuna", False),
        ("steps/train_step.py", "mlflow", True),
        ("metrics.py", "mlflow", False),
    ],
)
def test_allowed_places(module, library, expected):
    assert allowed(module, library) is expected


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from optuna.trial import TrialState\n    import mlflow.pyfunc\n")
    assert imported_top_levels(source) == {"optuna", "mlflow"}
