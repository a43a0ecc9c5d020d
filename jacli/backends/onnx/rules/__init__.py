"""Derivative rules, one module per operator family; importing this package registers
them all in :mod:`.registry`."""
from . import (  # noqa: F401  (they register their rules)
    attention, control, conv, elementwise, linalg, movement, norm, params, recurrent, reduce, resample,
)
from .registry import JVP_RULES, VJP_RULES, Entry, entries, lookup, operator_version

__all__ = ["Entry", "JVP_RULES", "VJP_RULES", "entries", "lookup", "operator_version"]
