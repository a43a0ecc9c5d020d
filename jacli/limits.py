"""How much jacli reads: the one limit on model files, zip members, stdin and input arrays,
and the bounded readers that enforce it. A leaf like ``system`` (which alone it imports):
io and backends use it, and pass the error class to raise.

The limit is half of the memory available when jacli starts reading (``system.available_memory``:
MemAvailable, lowered by a cgroup limit), or ``JACLI_READ_LIMIT`` (bytes, or a size such
as ``512M``, ``4G``) when that is set. It bounds:

- a model file, or the sum of a SavedModel directory's files, read into memory once;
- a zip archive (``.keras``, TorchScript, ``.pt2``, ``.npz``): the sum of its members'
  declared sizes, and every member as it inflates (never past its declared size);
- an input: the bytes its ``.npy`` header (or ``.h5`` dataset) declares, the arrays of one
  file together, and stdin.

Paths must name regular files: a device, FIFO or socket (``/dev/zero``, ``<(cmd)``) is
refused before anything is read. See docs/security.md.
"""
from __future__ import annotations

import os
import re
import stat
import zipfile

from .system import available_memory

MEMORY_SHARE = 0.5  # what jacli may read or inflate: at most this share of the available memory
ENV = "JACLI_READ_LIMIT"
_UNKNOWN = 8 << 30  # when the available memory cannot be told


def parse_size(text: str) -> int | None:
    """Bytes in '123', '512K', '1.5G', '2GiB'; None when it is not a size."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.I)
    if not m:
        return None
    return int(float(m.group(1)) * (1 << (10 * " kmgt".index(m.group(2).lower() or " "))))


def read_limit() -> tuple[int, str]:
    """(bytes jacli may read or inflate, where that number comes from) — for error messages."""
    override = os.environ.get(ENV)
    if override:
        size = parse_size(override)
        if size is None:
            raise ValueError(f"{ENV}={override!r} is not a size; use e.g. 512M or 4G")
        return size, f"the {ENV} limit of {size_text(size)}"
    avail = available_memory()
    if avail is None:
        return _UNKNOWN, f"jacli's limit of {size_text(_UNKNOWN)} (the available memory is unknown)"
    return int(MEMORY_SHARE * avail), f"{MEMORY_SHARE:.0%} of the {size_text(avail)} available"


def check_fits(nbytes: int, what: str, error: type[Exception], advice: str) -> None:
    """Raise ``error`` when ``nbytes`` is over the read limit."""
    try:
        limit, source = read_limit()
    except ValueError as e:
        raise error(str(e)) from None
    if nbytes > limit:
        raise error(f"{what} would need {size_text(nbytes)} of memory, more than {source}; {advice}")


def open_regular(path: str, what: str, error: type[Exception]) -> int:
    """An open file descriptor on ``path``, which must be a regular file (symbolic links are
    followed; opened non-blocking, so a FIFO cannot hang jacli). The caller closes it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise error(f"{what} {path} is {kind}; give a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd


def read_regular(path: str, what: str, error: type[Exception], used: int = 0) -> bytes:
    """The whole of the regular file ``path``, read once, within the read limit (``used``:
    bytes already read for the same model)."""
    fd = open_regular(path, what, error)
    try:
        size = os.fstat(fd).st_size
        check_fits(size + used, f"{what} {path} ({size_text(size)})", error, "see JACLI_READ_LIMIT")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(size)
            grew = f.read(1)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) != size or grew:
        raise error(f"{what} {path} changed while jacli read it; try again when nothing writes to it")
    return data


def read_stream_exactly(f, nbytes: int, what: str, error: type[Exception]) -> bytearray:
    """Exactly ``nbytes`` from the binary stream ``f``, into one buffer (nothing more is
    read), else ``error`` saying it was truncated."""
    buffer = bytearray(nbytes)
    view, done = memoryview(buffer), 0
    while done < nbytes:
        part = f.read(min(nbytes - done, 16 << 20))
        if not part:
            raise error(f"cannot read {what}: {size_text(done)} of the {size_text(nbytes)} its header "
                        "declares (truncated?)")
        view[done:done + len(part)] = part
        done += len(part)
    return buffer


def zip_members(z: zipfile.ZipFile, what: str, error: type[Exception]) -> list[zipfile.ZipInfo]:
    """The members of an open zip archive after its checks: no two members of one name (zip
    readers disagree on which one counts), and the sum of their declared sizes within the
    read limit. Reading a member through ``zipfile`` never inflates past its declared size."""
    infos = z.infolist()
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise error(f"{what} holds two members named {twice[0]!r}; refusing an archive that zip readers "
                    "read differently")
    total = sum(i.file_size for i in infos)
    check_fits(total, f"{what} (members inflating to {size_text(total)})", error,
               "refusing what may be a zip bomb (see JACLI_READ_LIMIT)")
    return infos


def read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, error: type[Exception], what: str) -> bytes:
    """One member, inflated in pieces up to its declared size (checked by ``zip_members``);
    its CRC is checked by ``zipfile`` at the end."""
    try:
        with z.open(info) as f:
            data = bytes(read_stream_exactly(f, info.file_size, f"{what}:{info.filename}", error))
            if f.read(1):
                raise error(f"{what}:{info.filename} inflates past its declared size")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise error(f"cannot read {what}:{info.filename}: {str(e)[:200] or type(e).__name__} (corrupt?)") from None
    return data


def size_text(nbytes: float) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):,.1f} {unit}"
    return f"{int(nbytes)} bytes"
