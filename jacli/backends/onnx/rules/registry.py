"""The registry of derivative rules: ``VJP_RULES``/``JVP_RULES`` keyed by operator, the
decorators that fill them, and small helpers shared by rules of every family."""
from __future__ import annotations

from typing import Callable


from ..graph import Builder, Node

# Operators whose outputs are integer/bool (or only depend on shapes): zero derivative.
NON_DIFFERENTIABLE = frozenset({
    "Shape", "Size", "ArgMax", "ArgMin", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "NonZero",
    "ConstantOfShape", "EyeLike", "RandomNormalLike", "RandomUniformLike", "BitShift",
})
# Float-valued but piecewise constant: derivative zero almost everywhere (as in PyTorch).
PIECEWISE_CONSTANT = frozenset({"Sign", "Floor", "Ceil", "Round", "Hardmax"})

# Operators whose derivative is implemented only for some inputs / outputs (the others are
# float tensors too, e.g. Conv weights, BatchNormalization statistics, Clip bounds).
_DIFF_INPUTS = {
    "Conv": (0, 2), "ConvTranspose": (0, 2), "BatchNormalization": (0,),
    "InstanceNormalization": (0,), "Clip": (0,), "Pad": (0,), "Dropout": (0,), "LRN": (0,),
}
_DIFF_OUTPUTS = {"LayerNormalization": (0,)}

# =====================================================================================
# Rules. A VJP rule maps (builder, node, cotangent per output or None) to {input index:
# cotangent} for every active input; a JVP rule maps (builder, node, tangent per input or
# None) to a tangent per output (None for non-float outputs).
# =====================================================================================
VJP_RULES: dict[str, Callable] = {}
JVP_RULES: dict[str, Callable] = {}


def vjp(*ops: str):
    def register(fn):
        for op in ops:
            VJP_RULES[op] = fn
        return fn

    return register


def jvp(*ops: str):
    def register(fn):
        for op in ops:
            JVP_RULES[op] = fn
        return fn

    return register


# --- elementwise unary: one function v -> v * f'(x) serves both modes ------------------
def unary(op: str):
    def register(apply: Callable[[Builder, Node, str], str]):
        VJP_RULES[op] = lambda b, n, gs: {0: apply(b, n, gs[0])}
        JVP_RULES[op] = lambda b, n, ts: [apply(b, n, ts[0])]
        return apply

    return register


def _c(b: Builder, n: Node, value: float) -> str:
    return b.scalar(value, n.dtype)


def _mask(b: Builder, n: Node, condition: str) -> str:
    """A bool condition as 1.0/0.0 in the derivative's dtype. Rules select with masks
    (v * m, or a m + c (1 - m), both exact for finite values) rather than Where, which
    onnxruntime runs several times slower than arithmetic."""
    return b.op("Cast", condition, to=n.dtype)


def _positive(b: Builder, n: Node) -> str:
    """1 where x > 0, else 0."""
    return _mask(b, n, b.op("Greater", n.x, _c(b, n, 0.0)))


def _blend(b: Builder, n: Node, m: str, a: str, c: str) -> str:
    """a where the mask m is 1, c where it is 0."""
    return b.op("Add", b.op("Mul", a, m), b.op("Mul", c, b.op("Sub", _c(b, n, 1.0), m)))

def _broadcast_dims(all_dims: list) -> list | None:
    """Static numpy-broadcast result of several dims lists (None if not all known)."""
    if any(d is None for d in all_dims):
        return None
    rank = max(len(d) for d in all_dims)
    out = []
    for i in range(rank):
        sizes = {d[len(d) - rank + i] for d in all_dims if len(d) - rank + i >= 0} - {1}
        if len(sizes) > 1 or None in sizes:
            return None
        out.append(sizes.pop() if sizes else 1)
    return out
