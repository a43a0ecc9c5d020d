"""The softmax family and reductions."""
from __future__ import annotations


import numpy as np

from ..graph import Builder, Node
from .registry import JVP_RULES, VJP_RULES, _c, _mask, jvp, vjp

# --- softmax family ---------------------------------------------------------------------
def _softmax_sum(b: Builder, n: Node, v: str) -> str:
    """Sum of ``v`` over the normalised axes, kept as size-1 axes (opset < 13: all axes
    from ``axis`` on, the input being seen as 2-D; opset >= 13: ``axis`` only)."""
    if b.opset >= 13:
        return b.reduce("ReduceSum", v, [n.attr("axis", -1)], keepdims=1)
    rank = b.rank(n.x, n)
    axis = n.attr("axis", 1) % rank
    return b.reduce("ReduceSum", v, list(range(axis, rank)), keepdims=1)


def _d_softmax(b: Builder, n: Node, v: str) -> str:
    p = b.op("Mul", v, n.y)  # y (v - sum(v y)); the Jacobian is symmetric
    return b.op("Sub", p, b.op("Mul", n.y, _softmax_sum(b, n, p)))


def _d_log_softmax(b: Builder, n: Node, v: str, transpose: bool) -> str:
    e = b.op("Exp", n.y)
    if transpose:  # g - softmax * sum(g)
        return b.op("Sub", v, b.op("Mul", e, _softmax_sum(b, n, v)))
    return b.op("Sub", v, _softmax_sum(b, n, b.op("Mul", e, v)))  # t - sum(softmax t)


VJP_RULES["Softmax"] = lambda b, n, gs: {0: _d_softmax(b, n, gs[0])}
JVP_RULES["Softmax"] = lambda b, n, ts: [_d_softmax(b, n, ts[0])]
VJP_RULES["LogSoftmax"] = lambda b, n, gs: {0: _d_log_softmax(b, n, gs[0], transpose=True)}
JVP_RULES["LogSoftmax"] = lambda b, n, ts: [_d_log_softmax(b, n, ts[0], transpose=False)]


# --- reductions -------------------------------------------------------------------------
def _reduce_axes(b: Builder, n: Node):
    """("noop" | None (all axes) | list of non-negative ints | tensor name), keepdims."""
    keepdims = n.attr("keepdims", 1)
    if "axes" in n.attrs:
        axes = list(n.attr("axes"))
    elif n.input(1) is not None:
        const = n.const(1)
        if const is None:
            return n.input(1), keepdims
        axes = [int(a) for a in np.ravel(const)]
    else:
        axes = []
    if not axes:
        return ("noop" if n.attr("noop_with_empty_axes", 0) else None), keepdims
    if any(a < 0 for a in axes):
        rank = b.rank(n.x, n)
        axes = [a % rank for a in axes]
    return sorted(axes), keepdims


def _with_kept_dims(b: Builder, n: Node, v: str, axes, keepdims: int) -> str:
    """``v`` (shaped like the reduction's result) with the reduced axes back as size 1."""
    if keepdims:
        return v
    if axes is None:
        return b.op("Reshape", v, b.ints([1] * b.rank(n.x, n)))
    if isinstance(axes, list):
        return b.unsqueeze(v, axes)
    shape = b.shape(n.x)  # run-time axes: set those entries of Shape(x) to 1
    rank = b.op("Size", shape)
    norm = b.op("Where", b.op("Less", axes, b.ints([0])), b.op("Add", axes, rank), axes)
    ones = b.op("Expand", b.ints([1]), b.op("Shape", norm))
    return b.op("Reshape", v, b.op("ScatterElements", shape, norm, ones, axis=0))


def _reduce_weights(b: Builder, n: Node, axes, keepdims: int) -> str | None:
    """dy/dx of the reduction per element of x (None: 1). With "noop" axes (empty, and
    noop_with_empty_axes) nothing is reduced but the elementwise part still applies
    (ReduceL1 gives |x|, ReduceSumSquare x^2, ...)."""
    op, x, noop = n.op_type, n.x, axes == "noop"
    if op == "ReduceSum" or (noop and op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd")):
        return None
    if op == "ReduceLogSum":  # 1 / sum(x)
        return b.op("Reciprocal", x if noop else b.reduce("ReduceSum", x, axes, keepdims=1))
    if op == "ReduceProd":
        return _product_of_others(b, n, axes)
    if op == "ReduceMean":
        return b.op("Div", b.op("Cast", b.op("Size", n.y), to=n.dtype), b.op("Cast", b.op("Size", x), to=n.dtype))
    y = n.y if noop else _with_kept_dims(b, n, n.y, axes, keepdims)
    if op in ("ReduceMax", "ReduceMin"):
        mask = b.op("Cast", b.op("Equal", x, y), to=n.dtype)
        return b.op("Div", mask, b.reduce("ReduceSum", mask, axes, keepdims=1))
    if op == "ReduceL2":
        zero = _c(b, n, 0.0)
        return b.op("Where", b.op("Equal", y, zero), zero, b.op("Div", x, y))
    if op == "ReduceL1":
        return b.op("Sign", x)
    if op == "ReduceSumSquare":
        return b.op("Add", x, x)
    if op == "ReduceLogSumExp":
        return b.op("Exp", b.op("Sub", x, y))
    raise AssertionError(op)


def _product_of_others(b: Builder, n: Node, axes) -> str:
    """dy/dx_i of y = prod(x) over ``axes``: the product of the other elements, computed
    without dividing by zero: P / x_i where no element is zero, P z_i where exactly one is
    (z: the zero mask, P the product of the non-zero elements), 0 where two or more are."""
    z = _mask(b, n, b.op("Equal", n.x, _c(b, n, 0.0)))
    nonzero = b.op("Add", n.x, z)  # x with its zeros replaced by 1
    p = b.reduce("ReduceProd", nonzero, axes, keepdims=1)
    count = b.reduce("ReduceSum", z, axes, keepdims=1)
    none, one = (_mask(b, n, b.op("Equal", count, _c(b, n, k))) for k in (0.0, 1.0))
    return b.op("Add", b.op("Mul", b.op("Div", p, nonzero), none), b.op("Mul", b.op("Mul", p, z), one))


_REDUCTIONS = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1", "ReduceSumSquare",
               "ReduceLogSumExp", "ReduceProd", "ReduceLogSum")


@vjp(*_REDUCTIONS)
def _vjp_reduce(b, n, gs):
    axes, keepdims = _reduce_axes(b, n)
    g = gs[0] if axes == "noop" else b.op("Expand", _with_kept_dims(b, n, gs[0], axes, keepdims), b.shape(n.x))
    w = _reduce_weights(b, n, axes, keepdims)
    return {0: g if w is None else b.op("Mul", g, w)}


@jvp(*_REDUCTIONS)
def _jvp_reduce(b, n, ts):
    axes, keepdims = _reduce_axes(b, n)
    if axes != "noop" and n.op_type in ("ReduceSum", "ReduceMean"):  # linear: the op itself
        return [b.same(n, ts[0], *n.inputs[1:])]
    w = _reduce_weights(b, n, axes, keepdims)
    t = ts[0] if w is None else b.op("Mul", ts[0], w)
    return [t if axes == "noop" else b.reduce("ReduceSum", t, axes, keepdims)]


@vjp("CumSum")
def _vjp_cumsum(b, n, gs):
    return {0: b.op("CumSum", gs[0], n.inputs[1], exclusive=n.attr("exclusive", 0), reverse=1 - n.attr("reverse", 0))}


@jvp("CumSum")
def _jvp_cumsum(b, n, ts):
    return [b.same(n, ts[0], n.inputs[1])]


# --- CumProd: y_i = prod_{j <= i} x_j along an axis ------------------------------------
# dy_i/dx_j = E_j A_ji for i >= j, with E_j = prod_{k < j} x_k (the exclusive product) and
# A_ji = prod_{j < k <= i} x_k: products only, so zeros need no care. A is (L, L) per line,
# a masked CumProd; the rule costs O(L^2) per line of length L along the axis.
class _CumProd:
    def __init__(self, b: Builder, n: Node):
        axis = n.const(1)
        if axis is None:
            raise n.unsupported("needs a constant axis")
        self.b, self.n = b, n
        self.rank = b.rank(n.x, n)
        self.axis = int(np.ravel(axis)[0]) % self.rank
        self.perm = list(range(self.rank))
        self.perm[self.axis], self.perm[-1] = self.perm[-1], self.perm[self.axis]
        x = self.to_line(n.x)
        last = self.rank - 1
        length = b.dim(n.x, self.axis)
        if isinstance(length, int):
            j, k = np.ogrid[:length, :length]
            later, upper = b.const(k > j), b.const((k >= j).astype(np.float64), n.dtype)
        else:
            zero, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
            r = b.op("Range", zero, b.op("Reshape", length, b.ints([])), one)
            later = b.op("Greater", b.unsqueeze(r, [0]), b.unsqueeze(r, [1]))
            upper = _mask(b, n, b.op("Not", b.op("Less", b.unsqueeze(r, [0]), b.unsqueeze(r, [1]))))
        minus1 = b.const(np.array(-1, np.int64))
        masked = b.op("Where", later, b.unsqueeze(x, [last]), _c(b, n, 1.0))
        self.a = b.op("Mul", b.op("CumProd", masked, minus1), upper)  # (..., j, i)
        self.e = b.op("CumProd", x, minus1, exclusive=1)
        self.last = last

    def _flip(self, v: str) -> str:
        if not self.n.attr("reverse", 0):
            return v
        b = self.b
        return b.op("Slice", v, b.ints([-1]), b.ints([-(2**63)]), b.ints([-1]), b.ints([-1]))

    def _transpose(self, v: str) -> str:
        return v if self.axis == self.rank - 1 else self.b.op("Transpose", v, perm=self.perm)

    def to_line(self, v: str) -> str:
        """v with the axis last, reversed for reverse=1."""
        return self._flip(self._transpose(v))

    def from_line(self, v: str) -> str:
        return self._transpose(self._flip(v))

    def shift(self, v: str, forward: bool) -> str:
        """exclusive=1: y_excl = (1, y_0, ..., y_{L-2}); its (co)tangent maps."""
        b = self.b
        if not self.n.attr("exclusive", 0):
            return v
        zeros = [0] * self.rank
        if forward:  # t_excl = (0, t_0, ..., t_{L-2})
            cut = b.op("Slice", v, b.ints([0]), b.ints([-1]), b.ints([-1]))
            return b.op("Pad", cut, b.ints(zeros[:-1] + [1] + zeros))
        cut = b.op("Slice", v, b.ints([1]), b.ints([2**63 - 1]), b.ints([-1]))  # g_incl = (g_1, ..., 0)
        return b.op("Pad", cut, b.ints(zeros + zeros[:-1] + [1]))


@vjp("CumProd", inputs=(0,))
def _vjp_cumprod(b, n, gs):
    c = _CumProd(b, n)
    g = c.shift(c.to_line(gs[0]), forward=False)
    back = b.squeeze(b.op("MatMul", c.a, b.unsqueeze(g, [c.last + 1])), [c.last + 1])
    return {0: c.from_line(b.op("Mul", c.e, back))}


@jvp("CumProd", inputs=(0,))
def _jvp_cumprod(b, n, ts):
    c = _CumProd(b, n)
    t = b.unsqueeze(b.op("Mul", c.e, c.to_line(ts[0])), [c.last])
    return [c.from_line(c.shift(b.squeeze(b.op("MatMul", t, c.a), [c.last]), forward=True))]
