"""Jacobian writers: ``.npy`` (one pair), ``.npz`` and ``.h5`` (one array per pair, named
``d{out}/d{in}``), ``-`` (``.npy`` bytes on stdout).

Every writer streams sample blocks into a temporary file in the target's directory and
renames it over the target only when everything is written; on any failure (including
Ctrl-C, and any OS error, which becomes one OutputError) the temporary file is removed and
an existing file of that name is untouched. The finished file gets the mode of the file it
replaces, or that of a new file under the umask. A target that this process read as its
model or input is refused.
Before anything is written, a writer refuses a Jacobian that the disk has no room for.
``.npy`` blocks go to their offsets with plain file writes rather than a memory map, so
written pages stay in the page cache instead of counting towards the process's memory.
"""
from __future__ import annotations

import abc
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..errors import OutputError
from ..system import new_file_mode, replace_atomically, was_read

SUFFIXES = (".npy", ".npz", ".h5", ".hdf5")


class Writer(abc.ABC):
    """Base: a temporary file next to ``path``; ``commit`` renames it into place."""

    def __init__(self, path: str, shapes: dict[str, tuple[int, ...]], dtype, meta: dict, batch: bool,
                 pieces: dict[str, tuple[int, str]] | None = None):
        self.path, self.shapes, self.dtype, self.meta, self.batch = Path(path), shapes, np.dtype(dtype), meta, batch
        self.pieces = pieces or {}  # key -> (output axes, "rows" | "columns"): samples that come in parts
        directory = self.path.parent
        if not directory.is_dir():
            raise OutputError(f"cannot write {path}: directory {directory} does not exist")
        if self.path.is_dir():
            raise OutputError(f"cannot write {path}: it is a directory")
        refuse_input(path)
        need, free = self._disk_bytes(), _free_bytes(directory)
        if free is not None and need > free:
            raise OutputError(
                f"cannot write {path}: the Jacobian needs {_size(need)} on disk but {directory} has "
                f"{_size(free)} free; write fewer samples (or --of/--wrt a part) or choose another directory"
            )
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".part")
            os.close(fd)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror}") from None
        self.tmp = Path(tmp)
        try:
            self._open()
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise OutputError(f"cannot write {path}: {_reason(e)}") from None
            raise

    def _open(self) -> None:
        """Prepare the temporary file for streaming."""

    def _disk_bytes(self) -> int:
        """Disk space the finished file (and any scratch files on the way) takes."""
        return sum(_nbytes(shape, self.dtype) for shape in self.shapes.values()) + (1 << 20)

    @abc.abstractmethod
    def write(self, key: str, s0: int, s1: int, block: np.ndarray) -> None:
        """Store samples s0:s1 of one Jacobian."""

    @abc.abstractmethod
    def write_part(self, key: str, s: int, rows: slice, cols: slice, block: np.ndarray, out_ndim: int) -> None:
        """Store entries rows x cols of sample s's Jacobian flattened to (outputs, inputs)."""

    def note(self, **meta) -> None:
        """Metadata known only once the numbers are computed (the mode that produced them,
        which ``jacobian.run`` returns), recorded before the file is finished."""
        self.meta.update(meta)

    def _finish(self) -> None:
        """Flush and close the temporary file."""

    def commit(self) -> None:
        try:
            self._finish()
            os.chmod(self.tmp, new_file_mode(str(self.path)))
            os.replace(self.tmp, self.path)
        except BaseException as e:  # also Ctrl-C/SIGTERM while finishing: no temporary file is left
            self.abort()
            if isinstance(e, OSError):
                raise OutputError(f"cannot write {self.path}: {_reason(e)}") from None
            raise

    def abort(self) -> None:
        try:
            self._close_quietly()
        except Exception:  # closing fails too when the disk is full: the file goes anyway
            pass
        finally:
            self.tmp.unlink(missing_ok=True)

    def _close_quietly(self) -> None:
        """Release open handles before the temporary file is removed."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
            return False
        self.abort()
        if isinstance(exc, OSError):  # a write failed: no space, I/O error, ...
            raise OutputError(f"cannot write {self.path}: {_reason(exc)}") from None
        return False

    def _store(self, target: np.ndarray, s0: int, s1: int, block: np.ndarray) -> None:
        if self.batch:
            target[s0:s1] = block
        else:
            target[...] = block[0]


class RawNpy:
    """An ``.npy`` file written sample block by sample block at computed offsets."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype, batch: bool):
        self.f = open(path, "r+b")
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        try:
            np.lib.format.write_array_header_1_0(self.f, header)
        except ValueError:  # a header over 64 KiB
            np.lib.format.write_array_header_2_0(self.f, header)
        self.offset = self.f.tell()
        self.sample = _nbytes(shape[1:], dtype) if batch else 0
        self.f.truncate(self.offset + _nbytes(shape, dtype))

    def write(self, s0: int, block: np.ndarray) -> None:
        self.f.seek(self.offset + s0 * self.sample)
        self.f.write(np.ascontiguousarray(block).data.cast("B"))

    def write_part(self, s: int, rows: slice, cols: slice, block: np.ndarray, n: int) -> None:
        """Entries rows x cols of sample s (flattened to n columns): one write for whole
        rows, else one per row."""
        start = self.offset + s * self.sample
        item = block.dtype.itemsize
        data = np.ascontiguousarray(block).data.cast("B")  # made contiguous once, then sliced per row
        if cols.start == 0 and cols.stop == n:
            self.f.seek(start + rows.start * n * item)
            self.f.write(data)
            return
        self.f.flush()
        fd, width = self.f.fileno(), block.shape[1] * item
        for j, r in enumerate(range(rows.start, rows.stop)):
            os.pwrite(fd, data[j * width : (j + 1) * width], start + (r * n + cols.start) * item)

    def close(self) -> None:
        self.f.close()


class NpyWriter(Writer):
    def _open(self):
        if len(self.shapes) != 1:
            raise OutputError(
                f"a .npy file holds one array but there are {len(self.shapes)} Jacobians "
                f"({', '.join(self.shapes)}); choose one with --of/--wrt or write .npz/.h5"
            )
        (shape,) = self.shapes.values()
        self.out = RawNpy(self.tmp, shape, self.dtype, self.batch)

    def write(self, key, s0, s1, block):
        self.out.write(s0, block)

    def write_part(self, key, s, rows, cols, block, out_ndim):
        self.out.write_part(s, rows, cols, block, _columns(self.shapes[key], out_ndim, self.batch))

    def _finish(self):
        self.out.close()

    def _close_quietly(self):
        out = self.__dict__.pop("out", None)
        if out is not None:
            out.close()


class NpzWriter(Writer):
    """Streams each array into a scratch .npy, then stores them uncompressed in the zip
    (``np.load`` reads it as usual, keys ``d{out}/d{in}`` and ``jacli_meta``)."""

    def _disk_bytes(self) -> int:
        return 2 * super()._disk_bytes()  # the scratch files and the zip, until the end

    def _open(self):
        self.scratch = {}
        for i, (key, shape) in enumerate(self.shapes.items()):
            fd, name = tempfile.mkstemp(dir=self.tmp.parent, prefix=f".{self.path.name}.{i}.", suffix=".part")
            os.close(fd)
            self.scratch[key] = (Path(name), None)  # removed on abort even if the next line fails
            self.scratch[key] = (Path(name), RawNpy(Path(name), shape, self.dtype, self.batch))

    def write(self, key, s0, s1, block):
        self.scratch[key][1].write(s0, block)

    def write_part(self, key, s, rows, cols, block, out_ndim):
        self.scratch[key][1].write_part(s, rows, cols, block, _columns(self.shapes[key], out_ndim, self.batch))

    def _finish(self):
        with zipfile.ZipFile(self.tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for key, (name, out) in self.scratch.items():
                out.close()
                big = name.stat().st_size >= zipfile.ZIP64_LIMIT
                with open(name, "rb") as src, z.open(key + ".npy", "w", force_zip64=big) as dst:
                    shutil.copyfileobj(src, dst, 4 << 20)
                name.unlink()
            meta = np.array(json.dumps(self.meta))
            with z.open("jacli_meta.npy", "w") as f:
                np.lib.format.write_array(f, meta, allow_pickle=False)
        self._close_quietly()

    def _close_quietly(self):
        for name, out in getattr(self, "scratch", {}).values():
            if out is not None:
                out.close()
            name.unlink(missing_ok=True)
        self.scratch = {}


class H5Writer(Writer):
    """Chunked datasets, metadata as attributes. Chunks of about 1 MiB: whole samples (one
    or more) when samples come whole; when they come in row (column) parts, chunks that
    such parts cover whole, so no chunk is read back and rewritten."""

    def _open(self):
        try:
            import h5py
        except ImportError:
            raise OutputError("writing .h5 needs h5py: pip install h5py") from None
        self.raw = _GuardedFile(self.tmp)
        self.f = h5py.File(self.raw, "w")
        self._attributes(self.meta)
        self.ds = {}
        for key, shape in self.shapes.items():
            if key in self.pieces:
                chunk = _piece_chunks(shape, self.dtype.itemsize, self.batch, *self.pieces[key])
            else:
                chunk = _h5_chunks(shape, self.dtype.itemsize, self.batch)
            self.ds[key] = self.f.create_dataset(key, shape=shape, dtype=self.dtype, chunks=chunk)
            for attr, value in self.meta.get("jacobians", {}).get(key, {}).items():
                self.ds[key].attrs[attr] = value if isinstance(value, str) else json.dumps(value)

    def _attributes(self, meta: dict) -> None:
        for k, v in meta.items():
            self.f.attrs[k] = v if isinstance(v, (str, int, float)) else json.dumps(v)

    def note(self, **meta) -> None:
        super().note(**meta)
        self._attributes(meta)

    def write(self, key, s0, s1, block):
        self._store(self.ds[key], s0, s1, block)
        self.raw.check()

    def store_arrays(self, group: str, arrays: dict[str, np.ndarray]) -> None:
        """Datasets ``group/name`` beside the Jacobians (a baseline's input and outputs)."""
        for name, a in arrays.items():
            self.f.create_dataset(f"{group}/{name}", data=np.asarray(a))

    def write_part(self, key, s, rows, cols, block, out_ndim):
        """As hyperslabs of the (sample, *outputs, *inputs) dataset: a flat range of rows or
        columns is a few rectangular pieces of the output (input) axes."""
        ds = self.ds[key]
        shape = ds.shape[1:] if self.batch else ds.shape
        outs, ins = shape[:out_ndim], shape[out_ndim:]
        lead = (s,) if self.batch else ()
        for oi, r0, r1 in slabs(outs, rows.start, rows.stop):
            for ii, c0, c1 in slabs(ins, cols.start, cols.stop):
                piece = block[r0 - rows.start : r1 - rows.start, c0 - cols.start : c1 - cols.start]
                ds[lead + oi + ii] = piece.reshape(_slab_shape(oi, outs) + _slab_shape(ii, ins))
        self.raw.check()

    def _finish(self):
        self.f.close()
        self.raw.close()
        self.raw.check()

    def _close_quietly(self):
        f = getattr(self, "f", None)
        if f is not None and f.id.valid:
            f.close()
        if getattr(self, "raw", None) is not None:
            self.raw.close()


class _GuardedFile(io.RawIOBase):
    """The file HDF5 writes through (h5py's fileobj driver). HDF5 crashes when it closes a
    file after a failed write (no space, a file size limit), so a failed write is kept
    here and the ones after it are dropped; the writer raises the first error
    (``check``) and the file is removed."""

    def __init__(self, path: Path):
        super().__init__()
        self.f, self.error = open(path, "r+b"), None

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, b):
        return self.f.readinto(b)

    def seek(self, offset, whence=0):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    def _guarded(self, op, *args):
        if self.error is None and not self.f.closed:
            try:
                return op(*args)
            except OSError as e:
                self.error = e
        return None

    def write(self, b):
        self._guarded(self.f.write, b)
        return len(b)

    def truncate(self, size=None):
        self._guarded(self.f.truncate, size)
        return size

    def flush(self):
        self._guarded(self.f.flush)

    def close(self):
        self._guarded(self.f.flush)
        self.f.close()
        super().close()

    def check(self) -> None:
        if self.error is not None:
            raise self.error


class StdoutWriter:
    """``.npy`` bytes on stdout (one pair); built in memory, written at the end."""

    def __init__(self, path, shapes, dtype, meta, batch, pieces=None):
        if sys.stdout is None:
            raise OutputError("cannot write to stdout: it is closed")
        if len(shapes) != 1:
            raise OutputError(f"-o - writes one .npy array but there are {len(shapes)} Jacobians; choose one with --of/--wrt")
        (shape,) = shapes.values()
        self.array, self.batch = np.empty(shape, dtype), batch

    def note(self, **meta) -> None:
        """``.npy`` bytes carry no metadata."""

    def write(self, key, s0, s1, block):
        Writer._store(self, self.array, s0, s1, block)

    def write_part(self, key, s, rows, cols, block, out_ndim):
        a = self.array[s] if self.batch else self.array
        a.reshape(int(np.prod(a.shape[:out_ndim])), -1)[rows, cols] = block

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            return False
        try:
            np.lib.format.write_array(sys.stdout.buffer, self.array, allow_pickle=False)
            sys.stdout.buffer.flush()
        except (OSError, ValueError) as e:  # a closed pipe (| head), a full disk; ValueError: stdout closed
            _silence_stdout()
            raise OutputError(f"cannot write to stdout: {_reason(e) if isinstance(e, OSError) else 'it is closed'}"
                              ) from None
        return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's own flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (tests), or already gone
        pass


def refuse_input(path: str) -> None:
    """Refuse an output path that names (or links to) the model or an input of this run."""
    if was_read(path):
        raise OutputError(f"refusing to write {path}: it is the model or an input file of this run; "
                          "choose another output name")


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def open_writer(path: str, shapes: dict[str, tuple[int, ...]], dtype, meta: dict, batch: bool = True,
                pieces: dict[str, tuple[int, str]] | None = None):
    """A writer for ``path`` chosen by its extension (``-`` for stdout). ``pieces``: for
    Jacobians whose samples will arrive in parts, (number of output axes, "rows" or
    "columns"), so that the file's layout suits such writes."""
    if path == "-":
        return StdoutWriter(path, shapes, dtype, meta, batch)
    suffix = Path(path).suffix.lower()
    cls = {".npy": NpyWriter, ".npz": NpzWriter, ".h5": H5Writer, ".hdf5": H5Writer}.get(suffix)
    if cls is None:
        raise OutputError(f"cannot write {path}: unknown extension {suffix or '(none)'}; use .npy, .npz or .h5")
    return cls(path, shapes, dtype, meta, batch, pieces)


def slabs(shape: tuple[int, ...], start: int, stop: int):
    """Rectangular pieces covering the C-order flat range [start, stop) of an array of
    ``shape``: yields ``(index, lo, hi)``, ``array[index]`` being flat entries lo:hi."""
    if start >= stop:
        return
    if len(shape) <= 1:
        yield ((slice(start, stop),) if shape else ()), start, stop
        return
    inner = int(np.prod(shape[1:]))
    (i0, r0), (i1, r1) = divmod(start, inner), divmod(stop, inner)
    if i0 == i1:  # within one index of the first axis
        pieces = [(i0, r0, r1)]
    else:
        pieces = [(i0, r0, inner)] if r0 else []
        first = i0 + (1 if r0 else 0)
        if i1 > first:
            yield (slice(first, i1),) + (slice(None),) * (len(shape) - 1), first * inner, i1 * inner
        pieces += [(i1, 0, r1)] if r1 else []
    for i, a, b in pieces:
        for index, lo, hi in slabs(shape[1:], a, b):
            yield (i,) + index, i * inner + lo, i * inner + hi


def _slab_shape(index: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of ``array[index]`` for a ``slabs`` index (integers drop their axis)."""
    return tuple(len(range(*i.indices(d))) for i, d in zip(index, shape) if isinstance(i, slice))


def _columns(shape: tuple[int, ...], out_ndim: int, batch: bool) -> int:
    """Input elements per sample of a Jacobian of this layout."""
    return int(np.prod(shape[(1 if batch else 0) + out_ndim :]))


def _nbytes(shape, dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.float64)) * dtype.itemsize


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def _h5_chunks(shape, itemsize: int, batch: bool) -> tuple[int, ...] | bool:
    """Chunks of about 1 MiB: whole trailing axes, one or more samples along the batch axis."""
    if not shape:
        return None  # a scalar dataset cannot be chunked
    if 0 in shape:
        return True
    per = int(np.prod(shape[1:], dtype=np.int64)) * itemsize if len(shape) > 1 else itemsize
    if not batch or per > (4 << 20):
        return True  # let h5py pick
    return (max(1, min(shape[0], (1 << 20) // max(per, 1))),) + tuple(shape[1:])


def _piece_chunks(shape, itemsize: int, batch: bool, out_ndim: int, direction: str) -> tuple[int, ...]:
    """About 1 MiB chunks for samples written in parts: for row parts (contiguous flat
    ranges of a sample) a C-order trailing block of the axes; for column parts every output
    row of a trailing block of the input axes (or, with more rows than fit, a trailing
    block of the output axes and one column)."""
    lead, dims = (1,) if batch else (), list(shape[1:] if batch else shape)
    target = max(1, (256 << 10) // itemsize)  # elements per chunk: a few fit in the default 1 MiB chunk cache
    if direction == "rows":
        return lead + _trailing(dims, target)
    outs, ins = dims[:out_ndim], dims[out_ndim:]
    rows = int(np.prod(outs))
    if rows <= target:
        return lead + tuple(outs) + _trailing(ins, target // rows)
    return lead + _trailing(outs, target) + (1,) * len(ins)


def _trailing(dims: list[int], target: int) -> tuple[int, ...]:
    """The largest C-order trailing block of ``dims`` with at most ``target`` elements: whole
    trailing axes, then a part of the next one."""
    chunk, size = [1] * len(dims), 1
    for j in reversed(range(len(dims))):
        if size * dims[j] <= target:
            chunk[j], size = dims[j], size * dims[j]
        else:
            chunk[j] = max(1, target // size)
            break
    return tuple(max(1, c) for c in chunk)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory."""
    target = Path(path)
    if not target.parent.is_dir():
        raise OutputError(f"cannot write {path}: directory {target.parent} does not exist")
    refuse_input(path)
    try:
        replace_atomically(target, data, new_file_mode(path))
    except OSError as e:
        raise OutputError(f"cannot write {path}: {_reason(e)}") from None
