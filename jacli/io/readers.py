"""Input arrays: ``.npy``, ``.npz`` (keys = input names), ``.h5`` (datasets = input
names), ``-`` (``.npy`` bytes on stdin), or random samples drawn from the signature."""
from __future__ import annotations

import math
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from .. import limits, system
from ..errors import InputError, UnsupportedError
from ..model import Model


def read_input(path: str, model: Model) -> dict[str, np.ndarray]:
    """Read the input file and match its arrays to the model's inputs by name."""
    arrays = _read_arrays(path)
    return match_inputs(arrays, model, source=path)


def _read_arrays(path: str) -> dict[str, np.ndarray]:
    if path == "-":
        return {"": _load_npy(sys.stdin.buffer, "stdin", whole=True)}
    p = Path(path)
    if not p.exists():
        raise InputError(f"input file not found: {path}")
    if p.is_dir():
        raise InputError(f"input {path} is a directory; give a .npy, .npz or .h5 file")
    fd = limits.open_regular(path, "input", InputError)  # not a device or FIFO
    with os.fdopen(fd, "rb") as f:
        magic = f.read(8)
        if magic.startswith(b"\x93NUMPY"):
            f.seek(0)
            arrays = {"": _load_npy(f, path, whole=True)}
    system.note_read(path)  # no output may replace it
    if magic.startswith(b"\x93NUMPY"):
        return arrays
    if magic.startswith(b"PK"):
        return _load_npz(p)
    if magic.startswith(b"\x89HDF"):
        return _load_h5(p)
    raise InputError(f"cannot read {path}: not a .npy, .npz or .h5 file (unrecognised contents)")


def _load_npy(f, what: str, used: int = 0, whole: bool = False) -> np.ndarray:
    """An array from the .npy stream ``f``: the header parsed and checked first, then exactly
    the bytes it declares; with ``whole``, anything after them is refused."""
    magic = f.read(8)
    if what == "stdin" and not magic:
        raise InputError("no input on stdin: pipe a .npy file in, or give a path")
    if len(magic) < 8 or not magic.startswith(b"\x93NUMPY"):
        raise InputError(f"cannot read {what}: not a .npy array (no .npy magic number)")
    try:
        read_header = np.lib.format.read_array_header_1_0 if magic[6:] == b"\x01\x00" else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
    except Exception as e:
        raise InputError(f"cannot read {what}: corrupt .npy header ({_short(e)})") from None
    _check_header(shape, dtype, what, used)
    dtype = np.dtype(dtype)
    count = math.prod(int(d) for d in shape)
    try:
        data = limits.read_stream_exactly(f, count * dtype.itemsize, what, InputError)
        if whole and f.read(1):
            raise InputError(f"cannot read {what}: bytes after the array its header declares (corrupt, or two "
                             "arrays?); give one .npy array")
    except OSError as e:
        raise InputError(f"cannot read {what}: {e.strerror}") from None
    return np.frombuffer(data, dtype, count).reshape(shape, order="F" if fortran else "C")


def _load_npz(p: Path) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(p) as z:
            out = {}
            for info in limits.zip_members(z, f"input {p}", InputError):
                if not info.filename.endswith(".npy"):
                    continue  # never inflated
                with z.open(info) as f:  # header first: nothing is inflated before the size check
                    used = sum(a.nbytes for a in out.values())
                    out[info.filename[: -len(".npy")]] = _load_npy(f, f"{p}:{info.filename}", used, whole=True)
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
    try:
        with h5py.File(p, "r") as f:
            out = _h5_arrays(f, str(p))
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read {p}: {_short(e)} (truncated or corrupt .h5?)") from None
    if not out:
        raise InputError(f"{p} holds no datasets")
    return out


def _self_contained(group, where: str) -> None:
    """Refuse an open h5py group where a link or a dataset keeps its data in another file."""
    import h5py

    external = []
    group.visititems_links(lambda name, link: external.append(name) if isinstance(link, h5py.ExternalLink) else None)
    if external:
        raise InputError(f"{where}:{external[0]} links to another file; jacli reads only self-contained .h5 files")

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and (obj.external or obj.is_virtual):
            raise InputError(f"{where}:{name} keeps its data in other files; jacli reads only self-contained .h5 files")

    group.visititems(visit)


def _h5_arrays(group, where: str) -> dict[str, np.ndarray]:
    """Every dataset under an open, self-contained h5py group, by path within it; refused
    before reading when the arrays would not fit in memory."""
    import h5py

    _self_contained(group, where)
    out: dict[str, np.ndarray] = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            _check_header(obj.shape or (), obj.dtype, f"{where}:{name}", sum(a.nbytes for a in out.values()))
            out[name] = obj[()]

    group.visititems(visit)
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


def _refuse_extra(arrays: dict, names: list[str], model: Model, source: str) -> None:
    """An array that no input (``names``) takes would be silently ignored: a misspelt name,
    or a value for an argument that keeps its default. Say which."""
    extra = [k for k in arrays if k not in names]
    if not extra:
        return
    optional = {a["name"]: a.get("default") for a in getattr(model, "optional_arguments", None) or ()}
    given = [k for k in extra if k in optional]
    if given:
        raise UnsupportedError(
            f"{source} has an array for {given[0]!r}, an argument of forward with a default ({optional[given[0]]}), "
            f"which jacli leaves at its default: it cannot be passed; drop the array, or save a model whose "
            f"forward takes it without a default")
    raise InputError(f"{source} has array(s) {', '.join(map(repr, extra))} that the model does not take "
                     f"(its inputs: {', '.join(names)}); rename or drop them")


def check_memory(nbytes: int, what: str) -> None:
    """Refuse arrays over the read limit (``limits``: a share of the available memory)."""
    limits.check_fits(nbytes, what, InputError, "use fewer samples")


def match_inputs(arrays: dict[str, np.ndarray], model: Model, source: str = "input") -> dict[str, np.ndarray]:
    """Assign arrays to model inputs by name (a single unnamed array goes to a single input),
    check ranks and fixed dimensions, and cast to the model's dtypes. Scalars and empty
    arrays are valid where the signature allows them (a scalar Clip bound, an ``axes`` input
    of static shape (0,)), not for an input with a batch axis; whether the arrays share a
    batch axis is the plan's check, which knows about --no-batch."""
    names = model.input_names()
    if set(arrays) >= set(names):
        _refuse_extra(arrays, names, model, source)
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


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


# --- baselines: a .h5 Jacobian file that also holds its input -------------------------------
BASELINE_INPUT, BASELINE_OUTPUT = "jacli_input", "jacli_output"  # groups beside the Jacobians


def arrays_sha256(xs: dict[str, np.ndarray]) -> str:
    """A digest of named arrays: names, dtypes, shapes and bytes, in name order."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(xs):
        a = np.ascontiguousarray(xs[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.data.cast("B"))
    return h.hexdigest()


def is_baseline(path: str) -> bool:
    """Whether ``path`` is an .h5 file written by ``jacli compute -o`` with its input stored."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        if not f.read(8).startswith(b"\x89HDF"):
            return False
    try:
        import h5py

        with h5py.File(p, "r") as f:
            return "jacli_version" in f.attrs and "jacobians" in f.attrs
    except Exception:
        return False


class Baseline:
    """An open baseline file: ``xs``/``ys`` (the stored input and outputs), ``meta`` (the
    metadata attributes), Jacobians read block by block (``read``, ``read_part``)."""

    def __init__(self, path: str):
        import json

        try:
            import h5py
        except ImportError:
            raise InputError("reading a baseline needs h5py: pip install h5py") from None
        self.path = path
        try:
            self.f = h5py.File(path, "r")
        except Exception as e:
            raise InputError(f"cannot read baseline {path}: {_short(e)} (truncated or corrupt .h5?)") from None
        try:
            _self_contained(self.f, path)  # the Jacobians too, read later in parts
            self.meta = {k: (json.loads(v) if k in ("inputs", "outputs", "jacobians", "locate_probes") else v)
                         for k, v in self.f.attrs.items()}
            self.jacobians = self.meta["jacobians"]
            if BASELINE_INPUT not in self.f:
                raise InputError(f"{path} holds Jacobians but not their input (written by an older jacli?); "
                                 "rewrite it with: jacli compute MODEL INPUT -o BASELINE.h5")
            self.xs = self._group(BASELINE_INPUT)
            self.ys = self._group(BASELINE_OUTPUT) if BASELINE_OUTPUT in self.f else {}
            want = self.meta.get("input_sha256")
            if want and arrays_sha256(self.xs) != want:
                raise InputError(f"{path}: the stored input does not match its sha256 (the file was altered?)")
            for key in self.jacobians:
                if key not in self.f or not isinstance(self.f[key], h5py.Dataset):
                    raise InputError(f"{path}: the metadata lists {key} but the file has no such dataset")
        except InputError:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise InputError(f"cannot read baseline {path}: {_short(e)}") from None
        self.batch = bool(self.meta.get("batch", True))
        self.input_names = [s["name"] for s in self.meta.get("inputs", [])] or list(self.xs)
        self.output_names = [s["name"] for s in self.meta.get("outputs", [])] or list(self.ys)

    def _group(self, group: str) -> dict[str, np.ndarray]:
        return _h5_arrays(self.f[group], f"{self.path}:{group}")

    def probes(self):
        """(order, tangents, values, J·v) stored by ``compute --locate-probes``, or None:
        ``order`` lists {tensor, node, op_type} in topological order."""
        order = self.meta.get("locate_probes")
        if not order or "jacli_locate" not in self.f:
            return None
        try:
            tangents = self._group("jacli_locate/tangent")
            values = {t["tensor"]: self.f[f"jacli_locate/t{j}/value"][()] for j, t in enumerate(order)}
            jvps = {t["tensor"]: self.f[f"jacli_locate/t{j}/jvp"][()] for j, t in enumerate(order)}
        except (KeyError, TypeError) as e:
            raise InputError(f"{self.path}: its locate probes are incomplete ({_short(e)})") from None
        return order, tangents, values, jvps

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.f[key].shape)

    def dtype(self, key: str) -> np.dtype:
        return self.f[key].dtype

    def read(self, key: str, s0: int, s1: int) -> np.ndarray:
        """Samples s0:s1 of a Jacobian, (s1 - s0, *out, *in) (the whole array, with a leading
        axis of 1, without a batch axis)."""
        ds = self.f[key]
        return ds[s0:s1] if self.batch else ds[()][None]

    def read_part(self, key: str, s: int, rows: slice, cols: slice, out_ndim: int) -> np.ndarray:
        """Entries rows x cols of sample s's Jacobian flattened to (outputs, inputs), read
        as rectangular pieces (never the whole sample)."""
        from .writers import _slab_shape, slabs

        ds = self.f[key]
        shape = ds.shape[1:] if self.batch else ds.shape
        outs, ins = shape[:out_ndim], shape[out_ndim:]
        lead = (s,) if self.batch else ()
        out = np.empty((rows.stop - rows.start, cols.stop - cols.start), ds.dtype)
        for oi, r0, r1 in slabs(outs, rows.start, rows.stop):
            for ii, c0, c1 in slabs(ins, cols.start, cols.stop):
                piece = ds[lead + oi + ii]
                out[r0 - rows.start : r1 - rows.start, c0 - cols.start : c1 - cols.start] = piece.reshape(
                    int(np.prod(_slab_shape(oi, outs))), -1)
        return out

    def close(self) -> None:
        f = getattr(self, "f", None)
        if f is not None and f.id.valid:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
