"""The package's import rule (STYLE.md): cli -> api, io, render; api -> backends, engine;
everything else -> model, errors only; nothing imports cli. And no framework at import."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "jacli"
ALLOWED = {
    "cli": {"api", "io", "render", "engine", "model", "errors", "cli", ""},
    "api": {"backends", "engine", "io", "model", "errors", "system", "limits", ""},
    "backends": {"model", "errors", "system", "limits", "backends"},
    "engine": {"model", "errors", "system", "engine"},
    "io": {"model", "errors", "system", "limits", "io"},
    "render": {"model", "errors", "render"},
}


def _internal_imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            rel = path.relative_to(PKG).parts
            base = list(rel[:-1])[: len(rel) - node.level]
            target = (base + (node.module.split(".") if node.module else []))
            yield target[0] if target else ""
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jacli"):
            parts = node.module.split(".")
            yield parts[1] if len(parts) > 1 else ""


def test_import_rule():
    problems = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        layer = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for target in _internal_imports(path):
            if target == "cli" and layer not in ("cli", "__main__"):
                problems.append(f"{rel} imports cli")
            allowed = ALLOWED.get(layer)
            if allowed is not None and target not in allowed | {"", "__init__"}:
                # "" is the package root (jacli.__version__)
                problems.append(f"{rel} ({layer}) imports {target}")
    assert problems == []


def test_importing_everything_pulls_in_no_framework():
    code = (
        "import sys, importlib, pkgutil, jacli, jacli.backends, jacli.backends.onnx\n"
        "for m in pkgutil.iter_modules(jacli.__path__, 'jacli.'):\n"
        "    if m.name in ('jacli.backends', 'jacli.__main__'): continue\n"
        "    importlib.import_module(m.name)\n"
        "    if m.ispkg:\n"
        "        for sub in pkgutil.walk_packages(sys.modules[m.name].__path__, m.name + '.'):\n"
        "            importlib.import_module(sub.name)\n"
        "print(sorted(n for n in ('torch', 'tensorflow', 'keras', 'onnxruntime', 'onnx') if n in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
