"""Small helpers shared by the loaders."""
from __future__ import annotations

import importlib

from ..errors import BackendMissing


def require(module: str, package: str, extra: str, fmt: str):
    """Import a framework module or raise one clear BackendMissing error."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackendMissing(package, extra, fmt) from None


def short(e: BaseException) -> str:
    """First line of an exception message, for one-line errors."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
