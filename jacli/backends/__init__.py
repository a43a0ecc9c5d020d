"""Loaders, one module per format family, imported only when a model of that format is
loaded. ``load(path)`` detects the format from the path (extension, directory contents,
magic bytes) unless ``fmt`` is given. Each loader reads the model once (``limits``) and
runs its format's checks (``*_checks``, ``onnx/checks``) on those bytes before the
framework sees them; see docs/security.md."""
from __future__ import annotations

import importlib
import importlib.util
import os
import zipfile
from pathlib import Path

from .. import limits, system
from ..errors import ModelLoadError, UnsafeModelError
from ..model import Model

LOADERS = {
    "onnx": "jacli.backends.onnx:load",
    "torchscript": "jacli.backends.torchscript:load",
    "torch-pickle": "jacli.backends.torchscript:load_pickle",
    "torch-export": "jacli.backends.torch_export:load",
    "keras": "jacli.backends.tf:load_keras",
    "savedmodel": "jacli.backends.savedmodel:load_savedmodel",
}
FORMATS = ("onnx", "torchscript", "torch-export", "keras", "savedmodel")


def detect_format(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model not found: {path}")
    if p.is_dir():
        if (p / "saved_model.pb").exists() or (p / "saved_model.pbtxt").exists():
            return "savedmodel"
        raise ModelLoadError(f"{path} is a directory without saved_model.pb; it is not a TensorFlow SavedModel")
    fd = limits.open_regular(path, "model", ModelLoadError)  # not a device or FIFO
    try:
        size = os.fstat(fd).st_size
        limits.check_fits(size, f"model {path} ({limits.size_text(size)})", ModelLoadError, "see JACLI_READ_LIMIT")
        magic = os.read(fd, 8)
    except OSError as e:
        raise ModelLoadError(f"cannot read model {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    suffix = p.suffix.lower()
    if not magic:
        raise ModelLoadError(f"model file {path} is empty")
    if magic.startswith(b"\x89HDF"):
        return "keras"
    if magic.startswith(b"PK"):
        return _zip_format(p)
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".pt", ".pth", ".pkl", ".bin", ".ckpt") and magic[:1] == b"\x80":
        return "torch-pickle"
    if suffix in (".h5", ".hdf5", ".keras", ".pt", ".pth", ".pt2", ".ts"):
        raise ModelLoadError(f"{path} is not a valid {suffix} file (unexpected contents; truncated or corrupt?)")
    raise ModelLoadError(
        f"cannot tell the format of {path}; supported: .keras/.h5 (Keras), SavedModel directories, "
        ".pt/.pth (TorchScript), .pt2 (torch.export), .onnx", option=f"--format {'|'.join(FORMATS)}",
        hint=f"format= one of {', '.join(map(repr, FORMATS))}")


def _zip_format(p: Path) -> str:
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except Exception as e:  # a damaged directory raises BadZipFile, OSError, UnicodeDecodeError, ...
        raise ModelLoadError(f"cannot read model {p}: corrupt or truncated archive ({e})") from None
    if "config.json" in names and any(n.startswith("model.weights") for n in names):
        return "keras"
    if any(n.endswith("/archive_format") for n in names) and any("/models/" in n for n in names) \
            or "serialized_exported_program.json" in names:  # torch.export.save (also its old layout)
        return "torch-export"
    if any("/code/" in n for n in names) or any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "torch-pickle"
    raise ModelLoadError(f"{p} is a zip archive but not a .keras model, a TorchScript archive or a torch.export .pt2")


def load(path: str, fmt: str | None = None, trust: bool = False, custom_objects=()) -> Model:
    """Load a model; ``trust`` allows formats that run code on load (see docs/security.md).
    ``custom_objects``: Python files or module names imported first (trusted code: they
    define custom Keras classes, or register output types with torch's pytree)."""
    if custom_objects:
        framework_first(path, fmt)
    modules = import_modules(custom_objects)
    if fmt is not None and fmt not in FORMATS:
        raise ModelLoadError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    detected = detect_format(path) if fmt is None else fmt
    if detected == "torchscript" and _is_torch_pickle(path):  # --format torchscript on a pickle
        detected = "torch-pickle"
    if detected == "torch-pickle" and not trust:
        raise UnsafeModelError(
            f"{path} is a plain torch.save pickle, which can run arbitrary code when loaded; "
            "save it with torch.jit.save (TorchScript) instead, or pass --trust-model if you trust its source"
        )
    module, func = LOADERS[detected].split(":")
    extra = {"custom_objects": modules} if detected == "keras" else {}
    model = getattr(importlib.import_module(module), func)(str(path), trust=trust, **extra)
    system.note_read(str(path))  # no output may replace it
    return model


def framework_first(path: str, fmt: str | None = None) -> None:
    """Before the user's --custom-objects modules run (and perhaps import Keras): start the
    framework ``path`` needs the way jacli starts it, TensorFlow with its C++ start-up chatter
    silenced (imported first by the user's module, it would print to the terminal). Nothing
    where the format cannot be told (load then says why)."""
    try:
        detected = fmt if fmt in FORMATS else detect_format(path) if fmt is None else None
    except ModelLoadError:
        return
    if detected in ("keras", "savedmodel"):
        from .tf import _tf

        _tf()


def import_modules(specs) -> list:
    """Import each of ``specs`` (a ``.py`` file, or a module name on sys.path; a module is
    taken as it is) and return the modules. This runs their code: the user vouches for it."""
    import sys
    import types

    modules = []
    for spec in specs or ():
        if isinstance(spec, types.ModuleType):  # imported already, for an earlier load
            modules.append(spec)
            continue
        spec = str(spec)
        try:
            if spec.endswith(".py") or Path(spec).is_file():
                file = Path(spec)
                if not file.is_file():
                    raise ModelLoadError(f"--custom-objects {spec}: no such file")
                found = importlib.util.spec_from_file_location(file.stem, file)
                module = importlib.util.module_from_spec(found)
                sys.modules[file.stem] = module  # as if imported by name (Keras records classes' modules)
                sys.path.insert(0, str(file.resolve().parent))  # its own imports of its neighbours
                try:
                    found.loader.exec_module(module)
                finally:
                    sys.path.remove(str(file.resolve().parent))
            else:
                module = importlib.import_module(spec)
        except (ModelLoadError, KeyboardInterrupt):
            raise
        except BaseException as e:  # its code is the user's: whatever it raises is reported, not a bug of jacli
            from ..errors import root_cause

            raise ModelLoadError(f"--custom-objects {spec}: importing it failed: {root_cause(e)}") from None
        modules.append(module)
    return modules


def _is_torch_pickle(path: str) -> bool:
    try:
        return detect_format(path) == "torch-pickle"
    except ModelLoadError:
        return False
