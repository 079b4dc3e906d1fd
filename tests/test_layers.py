"""The architecture holds: stages import only the layers below them, no module imports another in a
cycle (import-linter's contracts in pyproject.toml, module-level and function-level imports alike),
and an import inside a function defers a heavy dependency, never hides a cycle."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys

from tests.conftest import ROOT

TRAINER = ROOT / "trainer"
# What a function may defer importing: seconds of import time, or an optional extra.
HEAVY = ("tensorflow", "keras", "mlflow", "ray", "matplotlib", "sklearn", "scipy")


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    linter = shutil.which("lint-imports") or str(ROOT / ".venv" / "bin" / "lint-imports")
    return subprocess.run([linter, "--no-cache", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_import_contracts_hold():
    proc = lint_imports()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_the_contracts_catch_an_upward_import_inside_a_function(tmp_path):
    """The cycle that tracking once brought back (tracking -> retrain), put back inside a function in
    a copy of the tree: the layers contract names it."""
    copy = tmp_path / "repo"
    shutil.copytree(TRAINER, copy / "trainer")
    shutil.copy(ROOT / "pyproject.toml", copy)
    run = copy / "trainer" / "track" / "run.py"
    run.write_text(run.read_text() + "\n\ndef _commit():\n    from trainer.promote.retrain import main\n\n    return main\n")
    linter = shutil.which("lint-imports") or str(ROOT / ".venv" / "bin" / "lint-imports")
    proc = subprocess.run([linter, "--no-cache"], cwd=copy, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1, proc.stdout
    assert "BROKEN" in proc.stdout and "trainer.track.run -> trainer.promote.retrain" in proc.stdout


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p) for p in TRAINER.rglob("*.py")}


def imports(path) -> tuple[set[str], set[str]]:
    """(imported at module level, imported inside a function): the modules' full names
    (`from trainer.model import report` imports trainer.model.report)."""
    tree = ast.parse(path.read_text())
    top, inner = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        (top if node in tree.body else inner).update(names)
    return top, inner


def test_an_import_inside_a_function_defers_something_heavy():
    modules = {module_name(p): imports(p) for p in TRAINER.rglob("*.py")}

    def heavy(name: str, seen: set) -> bool:
        if name.split(".")[0] in HEAVY:
            return True
        if name not in modules or name in seen:
            return False
        seen.add(name)
        return any(heavy(m, seen) for m in modules[name][0])

    pointless = sorted(f"{name} imports {target} inside a function"
                       for name, (_, inner) in modules.items() for target in inner
                       if target in modules and not heavy(target, set()))
    assert not pointless, "\n".join(pointless)


def test_nothing_runs_on_import():
    """Every module imports with no output, no Ray and no TensorFlow started."""
    code = ("import importlib, pkgutil, sys, trainer\n"
            "for m in pkgutil.walk_packages(trainer.__path__, 'trainer.'): importlib.import_module(m.name)\n"
            "assert 'ray' not in sys.modules or not __import__('ray').is_initialized()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == ""
