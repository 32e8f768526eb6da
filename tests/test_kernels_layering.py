"""The kernels know tensors, not modules: nothing under ``fusionkern.kernels`` imports ``fusionkern.models``.

The glue that runs a reference layer on the kernels lives beside the models (:mod:`fusionkern.models.fused`), and the
Gabor tap grid both sides need lives in :mod:`fusionkern.gabor`, which imports nothing from the project.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import fusionkern.kernels

KERNELS_DIR = Path(fusionkern.kernels.__file__).parent

# Imports every module of fusionkern.kernels, then lists the fusionkern modules the interpreter holds.
_PROBE = """
import importlib, json, pkgutil, sys
import fusionkern.kernels as k
names = sorted(m.name for m in pkgutil.iter_modules(k.__path__, "fusionkern.kernels."))
for name in names:
    importlib.import_module(name)
print("PROBE" + json.dumps({"imported": names, "loaded": sorted(m for m in sys.modules if m.startswith("fusionkern"))}))
"""


def test_importing_every_kernel_module_loads_no_model_module():
    """A fresh interpreter imports each module of ``fusionkern.kernels``; no ``fusionkern.models`` module comes along."""
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE")), None)
    assert line is not None, f"the import probe failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    reply = json.loads(line[len("PROBE"):])
    expected = {f"fusionkern.kernels.{p.stem}" for p in KERNELS_DIR.glob("*.py") if p.stem != "__init__"}
    assert set(reply["imported"]) == expected  # the probe walked every module
    models = [m for m in reply["loaded"] if m == "fusionkern.models" or m.startswith("fusionkern.models.")]
    assert not models, f"importing fusionkern.kernels loaded {models}"


def _names_in(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import statement in ``source``, function-level ones included; relative imports
    are written with their leading dots."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, "." * node.level + (node.module or "")))
    return out


def _imported_names(path: Path) -> list[tuple[int, str]]:
    """The imports of a source file, and those of the programs it holds as strings (run in child interpreters)."""
    source = path.read_text(encoding="utf-8")
    found = _names_in(source)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
            try:
                found += [(node.lineno, name) for _, name in _names_in(node.value)]
            except SyntaxError:
                pass  # prose, not code
    return found


def test_no_kernel_source_imports_the_models():
    """Also the imports the fresh-interpreter check cannot see: those inside functions, run only when called."""
    offenders = [
        f"{path.name}:{line}: {name}"
        for path in sorted(KERNELS_DIR.glob("*.py"))
        for line, name in _imported_names(path)
        if name.startswith("fusionkern.models") or name.startswith("..")
    ]
    assert not offenders, offenders


def test_the_shared_gabor_grid_imports_nothing_from_the_project():
    imported = _names_in(Path(sys.modules["fusionkern"].__file__).with_name("gabor.py").read_text(encoding="utf-8"))
    assert not [name for _, name in imported if name.startswith(("fusionkern", "."))], imported
