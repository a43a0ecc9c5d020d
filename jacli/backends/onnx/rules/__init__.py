"""Derivative rules, one module per operator family; importing this package registers
them all in :mod:`.registry` (``VJP_RULES``/``JVP_RULES``)."""
from . import conv, elementwise, linalg, movement, norm, reduce  # noqa: F401  (they register their rules)
from .registry import _DIFF_INPUTS, _DIFF_OUTPUTS, JVP_RULES, NON_DIFFERENTIABLE, PIECEWISE_CONSTANT, VJP_RULES

__all__ = ["JVP_RULES", "VJP_RULES", "NON_DIFFERENTIABLE", "PIECEWISE_CONSTANT", "_DIFF_INPUTS", "_DIFF_OUTPUTS"]
