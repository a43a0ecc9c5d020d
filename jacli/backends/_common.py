"""Small helpers shared by the loaders."""
from __future__ import annotations

import importlib

from ..errors import BackendMissing, root_cause


def require(module: str, package: str, extra: str, fmt: str):
    """Import a framework module or raise one clear BackendMissing error."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackendMissing(package, extra, fmt) from None


def short(e: BaseException) -> str:
    """The framework's root cause of an exception, in one line (``errors.root_cause``)."""
    return root_cause(e, 300)


class Constants:
    """A framework's own copies of read-only numpy arrays that come back again and again
    (the engine's one-hot seed blocks): converted once, then looked up by identity. Writable
    arrays are converted every time (their contents may change)."""

    def __init__(self, convert, size: int = 16):
        self.convert, self.size, self.kept = convert, size, {}

    def __call__(self, a):
        if a.flags.writeable:
            return self.convert(a)
        hit = self.kept.get(id(a))
        if hit is not None and hit[0] is a:
            return hit[1]
        if len(self.kept) >= self.size:
            del self.kept[next(iter(self.kept))]
        t = self.convert(a)
        self.kept[id(a)] = (a, t)  # the array is kept too, so its id is not reused meanwhile
        return t
