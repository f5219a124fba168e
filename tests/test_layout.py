"""The library laid out by role (docs/how-it-works.md, "Where the code lives"): which folder may import which,
read from the source with ``ast`` (not from the code under test), and what ``import supermask_fx`` loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import supermask_fx

PACKAGE = Path(supermask_fx.__file__).parent
PASS = {"core", "methods", "graph", "selection", "cache"}  # the pass (discovery, gate, methods) and what it stands on
#: folder -> the folders it may import (arrows of the architecture, top to bottom; the pass is one layer)
ALLOWED = {
    "cache": set(),
    "selection": {"cache"},
    "graph": set(),
    "core": {"graph", "selection"},  # the core defines the method protocol and imports no method
    "methods": {"core", "selection"},
    "files": PASS,
    "__init__": PASS | {"files"},
    "integrations": PASS | {"files", "__init__"},
    "training": PASS | {"files", "__init__"},
    "data": {"cache", "files"},
    "models": {"data"},
    "experiments": PASS | {"files", "training", "data", "models", "__init__"},
}


def _imports(path: Path) -> set[str]:
    """The supermask_fx folders (first component below the package) that ``path`` imports."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts[:-1] if rel.name == "__init__" else rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            else:
                target = (node.module or "").split(".")
            names = [target + [alias.name] for alias in node.names] if len(target) == 1 else [target]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        for name in names:
            if name[0] == "supermask_fx" and len(name) > 1:
                sub = PACKAGE / name[1]
                is_part = sub.is_dir() or sub.with_suffix(".py").exists()
                found.add(name[1] if is_part else "__init__")  # a name of the public API: ``from .. import popupify``
    return found


def _folder(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "__init__"


def test_every_module_imports_only_the_layers_below_it():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        folder = _folder(path)
        assert folder in ALLOWED, f"{path}: a folder the layout does not know ({folder}); add it to ALLOWED and docs"
        for target in _imports(path) - {folder}:
            if target not in ALLOWED[folder]:
                bad.append(f"{path.relative_to(PACKAGE)} imports supermask_fx.{target}")
    assert not bad, "\n".join(bad)


def test_importing_the_library_loads_only_the_pass_selection_and_files():
    code = (
        "import sys, torch\n"
        "from supermask_fx import popupify, save_subnetwork\n"
        "m = popupify(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)), 0.5)\n"
        "m(torch.randn(3, 4)).sum().backward()\n"
        "print(sorted({k.split('.')[1] for k in sys.modules if k.startswith('supermask_fx.')}))\n"
        "print(sorted(k for k in ('transformers', 'accelerate', 'torchvision', 'datasets', 'scipy')"
        " if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert set(eval(out[0])) <= PASS | {"files"}, out[0]
    assert eval(out[1]) == [], out[1]
