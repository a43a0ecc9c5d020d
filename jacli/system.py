"""Facts about the machine, and file plumbing, that several layers need (no framework, no
jacli imports)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file (mode 0600) beside ``path`` and rename it over
    ``path``: readers see the old file or the new one, never a part. Raises OSError; the
    temporary file is gone on any failure (Ctrl-C included)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
