"""Input arrays: ``.npy``, ``.npz`` (keys = input names), ``.h5`` (datasets = input
names), ``-`` (``.npy`` bytes on stdin), or random samples drawn from the signature."""
from __future__ import annotations

import io
import math
import sys
import zipfile
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..model import Model
from ..system import available_memory

MEMORY_SHARE = 0.5  # inputs may take at most this share of the available memory


def read_input(path: str, model: Model) -> dict[str, np.ndarray]:
    """Read the input file and match its arrays to the model's inputs by name."""
    arrays = _read_arrays(path)
    return match_inputs(arrays, model, source=path)


def _read_arrays(path: str) -> dict[str, np.ndarray]:
    if path == "-":
        data = sys.stdin.buffer.read()
        if not data:
            raise InputError("no input on stdin: pipe a .npy file in, or give a path")
        return {"": _load_npy(io.BytesIO(data), "stdin")}
    p = Path(path)
    if not p.exists():
        raise InputError(f"input file not found: {path}")
    if p.is_dir():
        raise InputError(f"input {path} is a directory; give a .npy, .npz or .h5 file")
    with open(p, "rb") as f:
        magic = f.read(8)
    if magic.startswith(b"\x93NUMPY"):
        with open(p, "rb") as f:
            return {"": _load_npy(f, path)}
    if magic.startswith(b"PK"):
        return _load_npz(p)
    if magic.startswith(b"\x89HDF"):
        return _load_h5(p)
    raise InputError(f"cannot read {path}: not a .npy, .npz or .h5 file (unrecognised contents)")


def _load_npy(f, what: str, used: int = 0) -> np.ndarray:
    try:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (
            np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f)
        )
    except Exception as e:
        raise InputError(f"cannot read {what}: corrupt .npy header ({_short(e)})") from None
    _check_header(shape, dtype, what, used)
    f.seek(0)
    try:
        return np.load(f, allow_pickle=False)
    except Exception as e:
        raise InputError(f"cannot read {what}: {_short(e)} (truncated or corrupt .npy?)") from None


def _load_npz(p: Path) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(p) as z:
            out = {}
            for name in z.namelist():
                if not name.endswith(".npy"):
                    continue
                with z.open(name) as f:  # header first: nothing is inflated before the size check
                    out[name[: -len(".npy")]] = _load_npy(f, f"{p}:{name}", sum(a.nbytes for a in out.values()))
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read {p}: {_short(e)} (truncated or corrupt .npz?)") from None
    if not out:
        raise InputError(f"{p} holds no arrays")
    return out


def _load_h5(p: Path) -> dict[str, np.ndarray]:
    try:
        import h5py
    except ImportError:
        raise InputError("reading .h5 input needs h5py: pip install h5py") from None
    out: dict[str, np.ndarray] = {}
    try:
        with h5py.File(p, "r") as f:

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    if obj.external or obj.is_virtual:
                        raise InputError(f"{p}:{name} keeps its data in other files; jacli reads only self-contained .h5 input")
                    _check_header(obj.shape or (), obj.dtype, f"{p}:{name}", sum(a.nbytes for a in out.values()))
                    out[name] = obj[()]

            f.visititems(visit)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read {p}: {_short(e)} (truncated or corrupt .h5?)") from None
    if not out:
        raise InputError(f"{p} holds no datasets")
    return out


def _check_header(shape, dtype, what: str, used: int = 0) -> None:
    """Refuse, before anything is allocated, arrays jacli cannot use or hold in memory
    (``used``: bytes already taken by other arrays of the same input)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise InputError(f"{what}: dtype {dtype} is not numeric; jacli needs real numbers (float, int, uint or bool)")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise InputError(f"{what}: shape {shape} has a negative dimension (corrupt header?)")
    check_memory(math.prod(shape) * dtype.itemsize + used, f"{what}: shape {shape} of {dtype}")


def check_memory(nbytes: int, what: str) -> None:
    """Refuse arrays that would take more than MEMORY_SHARE of the available memory."""
    avail = available_memory()
    if avail is not None and nbytes > MEMORY_SHARE * avail:
        raise InputError(
            f"{what} would need {_size(nbytes)} of memory, more than {MEMORY_SHARE:.0%} of the "
            f"{_size(avail)} available; use fewer samples"
        )


def match_inputs(arrays: dict[str, np.ndarray], model: Model, source: str = "input") -> dict[str, np.ndarray]:
    """Assign arrays to model inputs by name (a single unnamed array goes to a single input),
    check ranks and fixed dimensions, and cast to the model's dtypes. Scalars and empty
    arrays are valid where the signature allows them (a scalar Clip bound, an ``axes`` input
    of static shape (0,)), not for an input with a batch axis; whether the arrays share a
    batch axis is the plan's check, which knows about --no-batch."""
    names = model.input_names()
    if set(arrays) >= set(names):
        matched = {n: arrays[n] for n in names}
    elif len(arrays) == 1 and len(names) == 1:
        matched = {names[0]: next(iter(arrays.values()))}
    elif "" in arrays:
        raise InputError(
            f"the model has {len(names)} inputs ({', '.join(names)}); a .npy holds one array — "
            "give a .npz or .h5 with one array per input name"
        )
    else:
        missing = [n for n in names if n not in arrays]
        raise InputError(
            f"{source} has no array for model input(s) {', '.join(missing)} (it has: {', '.join(arrays) or 'nothing'})"
        )
    out = {}
    specs = {s.name: s for s in model.inputs}
    for n in names:
        a = np.asarray(matched[n])
        spec = specs[n]
        if a.dtype.kind not in "biuf":
            raise InputError(f"input {n!r}: dtype {a.dtype} is not numeric")
        if spec.shape != () and a.ndim == 0:
            raise InputError(f"input {n!r} is a scalar; it needs a batch of at least one sample, shape (batch, ...)")
        if (spec.shape is None or (spec.shape and spec.shape[0] is None)) and a.size == 0:
            raise InputError(f"input {n!r} has shape {a.shape}, which holds no values; it needs a batch of at least one sample")
        if spec.shape is not None:
            want = spec.shape
            if a.ndim != len(want) or any(w is not None and w != d for w, d in zip(want[1:], a.shape[1:])):
                raise InputError(
                    f"input {n!r} has shape {a.shape}, but the model expects {_fmt_shape(want)} "
                    "(the first axis is the batch)"
                )
        dtype = np.dtype(spec.dtype)
        if a.dtype != dtype:
            if dtype.kind in "iub" and a.dtype.kind == "f" and not np.all(np.isfinite(a) & (a == np.round(a))):
                raise InputError(f"input {n!r} is {a.dtype} with fractional values, but the model expects {dtype}")
            a = a.astype(dtype)
        out[n] = np.require(a, requirements="C")  # (ascontiguousarray makes a scalar 1-D)
    return out


def random_input(model: Model, samples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``samples`` draws from N(0, 1) (floats) or small non-negative integers, shaped by the signature."""
    if samples < 1:
        raise InputError("--random needs a positive number of samples")
    rng = np.random.default_rng(seed)
    out = {}
    for spec in model.inputs:
        if spec.shape is None or any(d is None for d in spec.shape[1:]):
            raise InputError(
                f"cannot draw random samples for input {spec.name!r}: its shape is "
                f"{'unknown' if spec.shape is None else _fmt_shape(spec.shape)}; give an input file instead"
            )
        shape = (samples, *spec.shape[1:])
        dtype = np.dtype(spec.dtype)
        check_memory(math.prod(shape) * max(dtype.itemsize, 8), f"--random {samples} for input {spec.name!r}")
        out[spec.name] = (
            rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else rng.integers(0, 2, shape).astype(dtype)
        )
    return out


def nonfinite(xs: dict[str, np.ndarray]) -> list[str]:
    """Describe inputs holding NaN/Inf, e.g. ``["x: 3 NaN/Inf values, first in sample 0"]``."""
    notes = []
    for n, a in xs.items():
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a)
            if bad.any():
                first = int(np.argwhere(bad)[0][0])
                notes.append(f"{n}: {int(bad.sum())} NaN/Inf value(s), first in sample {first}")
    return notes


def _fmt_shape(shape) -> str:
    return "(" + ", ".join("batch" if i == 0 and d is None else ("?" if d is None else str(d)) for i, d in enumerate(shape)) + ")"


def _size(nbytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):,.1f} {unit}"
    return f"{nbytes} bytes"


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
