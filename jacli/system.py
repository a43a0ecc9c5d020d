"""Facts about the machine, and file plumbing, that several layers need (no framework, no
jacli imports)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace_atomically(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``:
    readers see the old file or the new one, never a part. The file keeps mode 0600 unless
    ``mode`` is given. Raises OSError; the temporary file is gone on any failure (Ctrl-C
    included)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if mode is not None:
                os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# The files this process read as a model or an input, by identity (device, inode, size,
# modification time): outputs must not replace them.
_READ: set[tuple[int, int, int, int]] = set()


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def note_read(path: str) -> None:
    """Remember that ``path`` (a file, or every file of a directory) was read as a model or input."""
    try:
        if os.path.isdir(path):
            for here, _, files in os.walk(path):
                _READ.update(_identity(os.stat(os.path.join(here, f))) for f in files)
        else:
            _READ.add(_identity(os.stat(path)))
    except OSError:
        pass


def was_read(path: str) -> bool:
    """Whether ``path`` is (a link to) a file this process read as a model or an input."""
    try:
        return _identity(os.stat(path)) in _READ
    except OSError:
        return False


def new_file_mode(path: str) -> int:
    """The permission bits an output replacing ``path`` gets: those of the file it replaces,
    else what a newly created file gets under the umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        pass
    umask = None
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)  # read it by setting it, then put it back
        os.umask(umask)
    return 0o666 & ~umask


def available_memory() -> int | None:
    """Bytes of memory a new allocation can still get: Linux MemAvailable (else psutil, if
    installed), lowered by a cgroup v2 limit (containers, CI); None when it cannot be told."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            import psutil

            free = int(psutil.virtual_memory().available)
        except ImportError:
            pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                headroom = max(0, int(limit) - int(f.read()))
            free = headroom if free is None else min(free, headroom)
    except (OSError, ValueError):
        pass
    return free


THREADS = "JACLI_THREADS"  # environment variable: threads per framework, overriding the policy


def thread_count(environ=None, cgroup: str = "/sys/fs/cgroup") -> int:
    """Threads each framework should use for its operators: ``JACLI_THREADS`` when set (a
    positive integer; ValueError otherwise), else the CPUs this process may run on (its
    affinity mask) lowered by a cgroup CPU quota (v2 ``cpu.max``, v1
    ``cpu/cpu.cfs_quota_us`` over ``cpu.cfs_period_us``), rounded up, at least 1. A
    framework left to itself counts the machine's cores, so in a container limited to 2 of
    64 it runs 64 threads that spin and wait on each other."""
    environ = os.environ if environ is None else environ
    asked = environ.get(THREADS, "").strip()
    if asked:
        if not asked.isdigit() or int(asked) < 1:
            raise ValueError(f"{THREADS}={asked!r}: set a positive number of threads, or unset it")
        return int(asked)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(Path(cgroup))
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_quota(root: Path) -> int | None:
    """CPUs a cgroup CPU quota allows (rounded up), or None without one."""
    try:
        limit, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "200000 100000"
    except (OSError, ValueError):
        try:  # v1
            limit = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        limit, period = int(limit), int(period)
    except ValueError:  # "max": no limit
        return None
    return -(-limit // period) if limit > 0 and period > 0 else None


MALLOC = "JACLI_MALLOC"  # environment variable: "off" leaves the C allocator's settings alone
# glibc's mallopt parameters, and the values the command line sets in its own process
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # allocations below it come from the heap, and are reused there
TRIM_THRESHOLD = 256 << 20  # free memory at the top of the heap kept for reuse, at most


def tune_allocator(environ=None) -> dict[str, int]:
    """For jacli's own process (the command line; the Python API leaves the caller's process
    alone): glibc's allocator keeps freed blocks below 32 MiB and up to 256 MiB of free heap
    for reuse, instead of handing them back to the kernel and page-faulting them in again on
    the next call (its dynamic thresholds do so once a burst of frees passes twice the largest
    freed block: the Conv1d net at 256 samples took 14,000 page faults a call). The peak
    resident size is unchanged (memory is kept only after it was in use). Nothing is changed
    where the user set ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` or
    ``JACLI_MALLOC=off``, or without glibc. Returns the settings made."""
    environ = os.environ if environ is None else environ
    if environ.get(MALLOC, "").strip().lower() in ("off", "0", "no") or any(
            v in environ for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return {}
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return {}
    except ValueError:  # no such confstr name: not glibc
        return {}
    mallopt = _libc("mallopt")
    if mallopt is None:
        return {}
    done = {}
    for name, param, value in (("mmap_threshold", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                               ("trim_threshold", _M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if mallopt(param, value) == 1:  # 1 on success
            done[name] = value
    return done


def release_free_memory() -> None:
    """Hand the memory the C allocator holds free back to the system (glibc ``malloc_trim``;
    nothing elsewhere). TensorFlow frees its graph-optimisation and kernel buffers into
    glibc's heaps, which keep them: without this, the resident size only grows."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


_LIBC: dict[str, object] = {}  # C library functions, once looked up (None: not there)


def _libc(name: str):
    """A function of the process's C library by name, or None (no C library to ask, as on
    Windows, or no such function in it: malloc_trim and mallopt are glibc's)."""
    if name not in _LIBC:
        try:
            import ctypes

            _LIBC[name] = getattr(ctypes.CDLL(None), name)
        except (OSError, AttributeError, TypeError):
            _LIBC[name] = None
    return _LIBC[name]
