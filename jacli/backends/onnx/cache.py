"""On-disk cache of what the ONNX loader works out with the ``onnx`` package, so that a model
seen before runs on onnxruntime alone (``import onnx`` costs more than the runtime).

An entry is a folder ``onnx/<sha256 of the model file>/<tag>/`` under the cache directory:
``$JACLI_CACHE_DIR`` (``off`` disables the cache), else ``$XDG_CACHE_HOME/jacli``, else
``~/.cache/jacli``. The tag names jacli's and onnxruntime's versions and fingerprints the
loader, cache and graph-builder sources and ``wire``'s sizes (which weights are fed decides
the derived graphs' inputs), so an upgrade, an edited checkout or other sizes start a new
entry. It holds ``meta.json`` (the signature; written only for models that pass every check
``--trust-model`` could skip) and derived graphs named ``<name>-<sha256 prefix of the
file>.onnx``, so a damaged file is noticed before onnxruntime sees it. The graphs hold
none of the model's large weights (``wire``: they are inputs, fed from the model file the
entry is keyed by), so an entry stays small whatever the model's size. Every file is
written to a temporary file and renamed into place. A cache that cannot be read or
written is never an error: the caller recomputes what it lacks.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ...model import TensorSpec

_PACKAGE = Path(__file__).parent  # every module of the ONNX backend (loader, checks, rules) makes entries


def entry(model_sha256: str) -> Path | None:
    """The folder for this model's entry (it may not exist yet); None when caching is off."""
    import onnxruntime

    from ... import __version__

    root = _root()
    if root is None:
        return None
    try:
        stats = [(str(f.relative_to(_PACKAGE)), f.stat()) for f in sorted(_PACKAGE.rglob("*.py"))]
    except OSError:  # not installed as files
        return None
    from . import wire

    sizes = (wire.MOVED_BYTES, wire.MOVED_TOTAL)
    sources = hashlib.sha256(repr([sizes, *((name, s.st_size, s.st_mtime_ns) for name, s in stats)]).encode()).hexdigest()[:12]
    return root / "onnx" / model_sha256 / f"jacli{__version__}-ort{onnxruntime.__version__}-{sources}"


def _root() -> Path | None:
    configured = os.environ.get("JACLI_CACHE_DIR", "")
    if configured == "off":
        return None
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "jacli"
    try:
        return Path.home() / ".cache" / "jacli"
    except RuntimeError:  # no home directory
        return None


def read_signature(folder: Path | None) -> tuple[list[TensorSpec], list[TensorSpec]] | None:
    """The inputs and outputs recorded in ``meta.json``; None if absent or damaged."""
    if folder is None:
        return None
    try:
        meta = json.loads((folder / "meta.json").read_bytes())
        return [_spec(d) for d in meta["inputs"]], [_spec(d) for d in meta["outputs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_signature(folder: Path | None, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    meta = {"inputs": [s.describe() for s in inputs], "outputs": [s.describe() for s in outputs]}
    _write(folder, "meta.json", json.dumps(meta, indent=1).encode())


def read_graph(folder: Path | None, name: str) -> bytes | None:
    """The bytes of a stored graph; None if there is none. Files whose contents no longer
    match their name are deleted."""
    if folder is None:
        return None
    try:
        for f in sorted(folder.glob(f"{name}-*.onnx")):
            data = f.read_bytes()
            if f.name == _graph_file(name, data):
                return data
            f.unlink()
    except OSError:
        pass
    return None


def write_graph(folder: Path | None, name: str, data: bytes) -> None:
    _write(folder, _graph_file(name, data), data)


def _graph_file(name: str, data: bytes) -> str:
    return f"{name}-{hashlib.sha256(data).hexdigest()[:16]}.onnx"


def _spec(d: dict) -> TensorSpec:
    name, shape, dtype = d["name"], d["shape"], d["dtype"]
    if not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(shape, (list, type(None))):
        raise TypeError("not a tensor spec")
    if shape is not None and not all(n is None or type(n) is int for n in shape):
        raise TypeError("not a shape")
    return TensorSpec(name, None if shape is None else tuple(shape), np.dtype(dtype).name)


def _write(folder: Path | None, filename: str, data: bytes) -> None:
    if folder is None:
        return
    from ...system import replace_atomically

    try:
        folder.mkdir(parents=True, exist_ok=True)
        replace_atomically(folder / filename, data)
    except OSError:
        pass
