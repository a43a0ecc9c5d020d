"""Data movement and indexing: reshape, transpose, expand, tile, concat, split, gather,
slice, pad."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from onnx import helper

from ..graph import Builder, Node
from .registry import _mask, jvp, vjp

# --- data movement ----------------------------------------------------------------------
@vjp("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def _vjp_reshape(b, n, gs):
    return {0: b.reshape_like(gs[0], n.x)}


@jvp("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Expand", "Tile", "Slice", "Gather",
      "GatherElements", "GatherND")
@jvp("Compress", "ReverseSequence", inputs=(0,))
def _jvp_same(b, n, ts):
    """Linear in the first input, other inputs being indices/shapes: the op itself."""
    return [b.same(n, ts[0], *n.inputs[1:])]


@vjp("Transpose")
def _vjp_transpose(b, n, gs):
    perm = n.attr("perm")
    return {0: b.op("Transpose", gs[0], perm=None if perm is None else [int(i) for i in np.argsort(perm)])}


@vjp("Expand")
def _vjp_expand(b, n, gs):
    return {0: b.unbroadcast(gs[0], b.dims(n.y), n.x, n)}


@vjp("Tile")
def _vjp_tile(b, n, gs):
    rank = b.rank(n.x, n)
    # (r0*d0, r1*d1, ...) -> (r0, d0, r1, d1, ...), then sum over the r axes
    pairs = b.op("Concat", b.unsqueeze(n.inputs[1], [1]), b.unsqueeze(b.shape(n.x), [1]), axis=1)
    split = b.op("Reshape", gs[0], b.op("Reshape", pairs, b.ints([-1])))
    return {0: b.reduce("ReduceSum", split, list(range(0, 2 * rank, 2)), keepdims=0)}


@vjp("Concat")
def _vjp_concat(b, n, gs):
    axis = n.attr("axis")
    if axis < 0:
        axis %= b.rank(next((i for i in n.inputs if b.dims(i) is not None), n.y), n)
    out, start = {}, 0
    for i, x in enumerate(n.inputs):
        end = b.iadd(start, b.dim(x, axis))
        if i in n.active:
            out[i] = b.op("Slice", gs[0], b.ivec([start]), b.ivec([end]), b.ints([axis]))
        start = end
    return out


@jvp("Concat")
def _jvp_concat(b, n, ts):
    parts = [t if t is not None else b.zeros_like(x, n.dtype) for x, t in zip(n.inputs, ts)]
    return [b.op("Concat", *parts, axis=n.attr("axis"))]


@vjp("Split")
def _vjp_split(b, n, gs):
    parts = [g if g is not None else b.zeros_like(y, n.dtype) for y, g in zip(n.outputs, gs)]
    return {0: b.op("Concat", *parts, axis=n.attr("axis", 0))}


@jvp("Split")
def _jvp_split(b, n, ts):
    outs = b.same(n, ts[0], *n.inputs[1:], n_out=len(n.outputs))
    return outs if len(n.outputs) > 1 else [outs]


def _scatter_back(b: Builder, n: Node, g: str, op_inputs: Sequence[str], unique: bool) -> str:
    """VJP of a pure selection op (each output element is some element of x): apply the
    same op to the positions 0..size-1 of x and scatter-add g back to those positions."""
    x = n.x
    size = b.op("Size", x)
    start, step = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    positions = b.op("Reshape", b.op("Range", start, size, step), b.shape(x))
    taken = b.op("Reshape", b.same(n, positions, *op_inputs), b.ints([-1]))
    if not unique and b.opset < 16:  # no scatter-add before opset 16: a one-hot (taken x size) matrix
        onehot = _mask(b, n, b.op("Equal", b.unsqueeze(taken, [1]),
                                  b.unsqueeze(b.op("Range", start, size, step), [0])))
        return b.reshape_like(b.op("MatMul", b.op("Reshape", g, b.ints([1, -1])), onehot), x)
    zeros = b.op("ConstantOfShape", b.op("Reshape", size, b.ints([1])),
                 value=helper.make_tensor("value", n.dtype, [1], [0.0]))
    flat = b.op("ScatterElements", zeros, taken, b.op("Reshape", g, b.ints([-1])), axis=0,
                reduction=None if unique else "add")
    return b.reshape_like(flat, x)


def _const_indices_unique(b: Builder, n: Node) -> bool:
    idx = n.const(1)
    if idx is None:
        return False
    if n.op_type == "Gather":
        size = b.dims(n.x)[n.attr("axis", 0)] if b.dims(n.x) else None
        if idx.size <= 1:
            return True
        if not isinstance(size, int):
            return bool(np.all(idx >= 0)) and np.unique(idx).size == idx.size
        return np.unique(np.where(idx < 0, idx + size, idx)).size == idx.size
    return False


@vjp("Gather")
def _vjp_gather(b, n, gs):
    return {0: _scatter_back(b, n, gs[0], n.inputs[1:], unique=_const_indices_unique(b, n))}


@vjp("GatherElements", "GatherND")
def _vjp_gather_elements(b, n, gs):
    return {0: _scatter_back(b, n, gs[0], n.inputs[1:], unique=False)}


@vjp("Slice")
def _vjp_slice(b, n, gs):
    consts = [n.const(i) for i in range(1, 5)]
    dims = b.dims(n.x)
    if dims is not None and all(c is not None or n.input(i + 1) is None for i, c in enumerate(consts)):
        starts, ends = consts[0], consts[1]
        axes = consts[2] if consts[2] is not None else np.arange(len(starts))
        steps = consts[3] if consts[3] is not None else np.ones(len(starts), np.int64)
        axes = [int(a) % len(dims) for a in axes]
        if all(s == 1 for s in steps) and all(isinstance(dims[a], int) for a in axes):
            pads = [0] * (2 * len(dims))  # the adjoint of a unit-step slice is a zero pad
            for a, s, e in zip(axes, starts, ends):
                lo, hi, _ = slice(int(s), int(e)).indices(dims[a])
                hi = max(hi, lo)
                pads[a], pads[len(dims) + a] = lo, dims[a] - hi
            return {0: b.op("Pad", gs[0], b.ints(pads))}
    return {0: _scatter_back(b, n, gs[0], n.inputs[1:], unique=True)}


@vjp("Pad", inputs=(0,))
def _vjp_pad(b, n, gs):
    mode = n.attr("mode", "constant")
    if mode == "constant":  # crop: pad by the negated amounts
        pads = n.const(1)
        neg = b.ints(-pads) if pads is not None else b.op("Neg", n.inputs[1])
        return {0: b.same(n, gs[0], neg, *_pad_rest(n))}
    return {0: _scatter_back(b, n, gs[0], [n.inputs[1], *_pad_rest(n)], unique=False)}


def _pad_rest(n: Node) -> list[str]:
    """Pad's inputs after ``pads`` without the padding value (zero / unused): only axes."""
    return ["", n.inputs[3]] if n.input(3) else []


@jvp("Pad", inputs=(0,))
def _jvp_pad(b, n, ts):
    return [b.same(n, ts[0], n.inputs[1], *_pad_rest(n))]


@vjp("Compress", inputs=(0,))
def _vjp_compress(b, n, gs):
    return {0: _scatter_back(b, n, gs[0], n.inputs[1:], unique=True)}


@vjp("ReverseSequence", inputs=(0,))
def _vjp_reverse_sequence(b, n, gs):
    """A permutation that is its own inverse."""
    return {0: b.same(n, gs[0], n.inputs[1])}


# --- TopK (values) ------------------------------------------------------------------------
def _topk_axis(b: Builder, n: Node) -> int:
    return n.attr("axis", -1) % b.rank(n.x, n)


@vjp("TopK", inputs=(0,), outputs=(0,))
def _vjp_topk(b, n, gs):
    indices = n.outputs[1]  # distinct along the axis: no accumulation
    return {0: b.op("ScatterElements", b.zeros_like(n.x, n.dtype), indices, gs[0], axis=_topk_axis(b, n))}


@jvp("TopK", inputs=(0,), outputs=(0,))
def _jvp_topk(b, n, ts):
    return [b.op("GatherElements", ts[0], n.outputs[1], axis=_topk_axis(b, n)), None]


# --- ScatterND / ScatterElements ------------------------------------------------------------
class _Scatter:
    """y = x with updates written (none), added (add) or multiplied (mul) at the indexed
    positions; gather/scatter: the op's pair (GatherND/ScatterND or GatherElements/
    ScatterElements, with the axis)."""

    def __init__(self, b: Builder, n: Node):
        self.b, self.n = b, n
        self.reduction = n.attr("reduction", "none")
        if self.reduction not in ("none", "add", "mul"):
            raise n.unsupported(f"with reduction='{self.reduction}' has no derivative rule in jacli")
        self.idx, self.upd = n.inputs[1], n.inputs[2]
        self.attrs = {"axis": n.attr("axis", 0)} if n.op_type == "ScatterElements" else {}

    def gather(self, v: str) -> str:
        return self.b.op("GatherND" if self.n.op_type == "ScatterND" else "GatherElements", v, self.idx, **self.attrs)

    def scatter(self, v: str, updates: str, reduction: str | None = None) -> str:
        return self.b.op(self.n.op_type, v, self.idx, updates, reduction=reduction, **self.attrs)

    def check_unique(self) -> None:
        """The derivative of a mul-reduction w.r.t. the updates needs each position once."""
        if not _scatter_positions_unique(self.b, self.n):
            raise self.n.unsupported("has no derivative rule with respect to its updates with reduction='mul' "
                                     "unless its indices are constant and distinct")


def _scatter_positions_unique(b: Builder, n: Node) -> bool:
    idx, dims = n.const(1), b.dims(n.x)
    if idx is None or dims is None or not all(isinstance(d, int) for d in dims):
        return False
    if n.op_type == "ScatterND":
        q = idx.shape[-1]
        rows = idx.reshape(-1, q) % np.array(dims[:q])
    else:
        axis = n.attr("axis", 0) % len(dims)
        coords = list(np.indices(idx.shape))
        coords[axis] = idx % dims[axis]
        rows = np.stack([c.ravel() for c in coords], 1)
    return len({tuple(r) for r in rows.tolist()}) == len(rows)


@vjp("ScatterND", "ScatterElements", inputs=(0, 2))
def _vjp_scatter(b, n, gs):
    s, g, out = _Scatter(b, n), gs[0], {}
    if 0 in n.active:
        out[0] = {"none": lambda: s.scatter(g, b.zeros_like(s.upd, n.dtype)), "add": lambda: g,
                  "mul": lambda: s.scatter(g, s.upd, "mul")}[s.reduction]()
    if 2 in n.active:
        if s.reduction == "mul":
            s.check_unique()
            out[2] = b.op("Mul", s.gather(g), s.gather(n.x))
        else:
            out[2] = s.gather(g)
    return out


@jvp("ScatterND", "ScatterElements", inputs=(0, 2))
def _jvp_scatter(b, n, ts):
    s, tx, tu = _Scatter(b, n), ts[0], ts[2]
    if s.reduction == "mul":
        terms = [s.scatter(tx, s.upd, "mul") if tx else None]
        if tu:
            s.check_unique()
            terms.append(s.scatter(b.zeros_like(n.x, n.dtype), b.op("Mul", s.gather(n.x), tu)))
        return [b.add(*terms)]
    tx = tx or b.zeros_like(n.x, n.dtype)
    tu = tu or b.zeros_like(s.upd, n.dtype)
    return [s.scatter(tx, tu, None if s.reduction == "none" else "add")]
