"""The package's import rule (STYLE.md): cli -> api, io, render; api -> backends, engine;
everything else -> model, errors only; nothing imports cli. And no framework at import."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "jacli"
# layer -> the top-level parts of jacli it may import; any layer may import its own parts and
# the package root's own names ("", e.g. jacli.__version__)
ALLOWED = {
    "__init__": {"api"},
    "__main__": {"cli"},
    "cli": {"api", "io", "render", "engine", "model", "errors"},
    "api": {"backends", "engine", "io", "model", "errors", "system", "limits"},
    "backends": {"model", "errors", "system", "limits", "backends"},
    "engine": {"model", "errors", "system", "engine"},
    "io": {"model", "errors", "system", "limits", "io"},
    "render": {"model", "errors", "render"},
    "model": {"errors"},
    "errors": set(),
    "system": {"errors"},
    "limits": {"errors", "system"},  # resource limits for untrusted files (issue 11)
}


def imported_parts(path: Path, pkg: Path) -> list[str]:
    """The top-level parts of the package (``backends``, ``cli``, ...; "" for the package
    root's own names) that the module at ``path`` imports, anywhere in it (function-level
    imports too), with relative imports resolved from the module's own package."""
    rel = path.relative_to(pkg)
    package = list(rel.parts[:-1])  # the package the module is in (for __init__.py: itself)
    subpackages = {p.stem for p in pkg.iterdir() if p.is_dir() or p.suffix == ".py"}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level - 1 > len(package):
                found.append("<beyond the package>")
                continue
            base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            if base:
                found.append(base[0])
            else:  # ``from .. import backends``: each name is a submodule, or an attribute of the root
                found += [a.name if a.name in subpackages else "" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == pkg.name:
            parts = node.module.split(".")
            if len(parts) > 1:
                found.append(parts[1])
            else:
                found += [a.name if a.name in subpackages else "" for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == pkg.name:
                    found.append(parts[1] if len(parts) > 1 else "")
    return found


def rule_violations(pkg: Path = PKG) -> list[str]:
    problems = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg)
        layer = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        allowed = ALLOWED.get(layer)
        if allowed is None:
            problems.append(f"{rel}: layer {layer!r} has no import rule in tests/test_layout.py")
            continue
        for target in imported_parts(path, pkg):
            if target == "cli" and layer not in ("cli", "__main__"):
                problems.append(f"{rel} imports cli")
            elif target not in allowed | {layer, ""}:
                problems.append(f"{rel} ({layer}) imports {target or 'the package root'}")
    return problems


def test_import_rule():
    assert rule_violations() == []


def test_import_rule_catches_planted_violations(tmp_path):
    """The checker itself: each planted bad import is reported, the good ones are not."""
    pkg = tmp_path / "jacli"
    files = {
        "__init__.py": "from .api import load\n",
        "errors.py": "",
        "model.py": "from .errors import InputError\n",
        "api.py": "from . import backends\nfrom .engine import jacobian\n",
        "cli/__init__.py": "",
        "cli/main.py": "from .. import __version__\nfrom ..api import load\nfrom . import options\n",
        "cli/options.py": "",
        "backends/__init__.py": "from ..errors import ModelLoadError\n",
        "backends/tf.py": "def f():\n    from ..cli.main import main\n",  # a function-level import of cli
        "engine/__init__.py": "",
        "engine/jacobian.py": "from ..model import Model\nfrom . import stats\n",
        "engine/stats.py": "",
        "engine/spectral.py": "from .. import backends\n",  # the case the old resolution missed
        "engine/check.py": "import jacli.cli.main\n",
        "render/view.py": "from jacli import api\n",
        "io/readers.py": "from ...outside import thing\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    assert sorted(rule_violations(pkg)) == sorted([
        "backends/tf.py imports cli",
        "engine/check.py imports cli",
        "engine/spectral.py (engine) imports backends",
        "io/readers.py (io) imports <beyond the package>",
        "render/view.py (render) imports api",
    ])


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
