"""Small helpers shared by the loaders."""
from __future__ import annotations

import importlib
import os
import sys

from ..errors import BackendMissing, InputError, root_cause
from ..system import THREADS, thread_count


def require(module: str, package: str, extra: str, fmt: str):
    """Import a framework module or raise one clear BackendMissing error; the first import
    of torch or TensorFlow also sets its thread pools (``threads``)."""
    if module == "torch" and "torch" not in sys.modules:
        # OpenMP threads that finish a parallel region sleep instead of spinning: jacli makes
        # many small calls, and spinning pool threads made 2-thread calls 2-15x slower on a
        # busy machine. Read once, when torch loads its OpenMP runtime; the caller's setting stands.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise BackendMissing(package, extra, fmt) from None
    if module in _THREAD_SETTERS and module not in _threaded:
        _THREAD_SETTERS[module](mod)
        _threaded.add(module)
    return mod


def threads() -> int:
    """Threads per framework (``system.thread_count``); a bad JACLI_THREADS is bad input.
    Counted once per value of JACLI_THREADS (reading the cgroup's quota took 54 us, and
    ONNX models ask on every derivative call: lanes.py)."""
    asked = os.environ.get(THREADS, "")
    if asked not in _counted:
        try:
            _counted[asked] = thread_count()
        except ValueError as e:
            raise InputError(str(e)) from None
    return _counted[asked]


_counted: dict[str, int] = {}


def _torch_threads(torch) -> None:
    """At most the usable CPUs (a lower count the caller set stays), exactly JACLI_THREADS."""
    n = threads()
    torch.set_num_threads(n if os.environ.get(THREADS, "").strip() else min(n, torch.get_num_threads()))


def _tf_threads(tf) -> None:
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads())
        tf.config.threading.set_inter_op_parallelism_threads(threads())
    except RuntimeError:  # the runtime has started (the caller's own TensorFlow work): its settings stand
        pass


_THREAD_SETTERS = {"torch": _torch_threads, "tensorflow": _tf_threads}
_threaded: set[str] = set()


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
