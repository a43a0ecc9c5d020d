"""Linear algebra: Gemm, MatMul, Einsum and Det."""
from __future__ import annotations

import string
from collections import Counter

import numpy as np
from onnx import helper

from ..graph import Builder, Node
from .registry import _c, jvp, vjp

# --- linear algebra ---------------------------------------------------------------------
@vjp("Gemm")
def _vjp_gemm(b, n, gs):
    a, c = n.inputs[:2]
    ta, tb, alpha, beta = n.attr("transA", 0), n.attr("transB", 0), n.attr("alpha", 1.0), n.attr("beta", 1.0)
    g, out = gs[0], {}
    if 0 in n.active:  # dA' = alpha g B'^T
        out[0] = (b.op("Gemm", g, c, alpha=alpha, transB=1 - tb) if not ta
                  else b.op("Gemm", c, g, alpha=alpha, transA=tb, transB=1))
    if 1 in n.active:  # dB' = alpha A'^T g
        out[1] = (b.op("Gemm", a, g, alpha=alpha, transA=1 - ta) if not tb
                  else b.op("Gemm", g, a, alpha=alpha, transA=1, transB=ta))
    if 2 in n.active:
        gc = g if beta == 1.0 else b.op("Mul", g, _c(b, n, beta))
        out[2] = b.unbroadcast(gc, b.dims(n.y), n.inputs[2], n)
    return out


@jvp("Gemm")
def _jvp_gemm(b, n, ts):
    a, c = n.inputs[:2]
    attrs = dict(alpha=n.attr("alpha", 1.0), transA=n.attr("transA", 0), transB=n.attr("transB", 0))
    terms = [b.op("Gemm", ts[0], c, **attrs) if ts[0] else None, b.op("Gemm", a, ts[1], **attrs) if ts[1] else None]
    if len(ts) > 2 and ts[2]:
        beta = n.attr("beta", 1.0)
        tc = ts[2] if beta == 1.0 else b.op("Mul", ts[2], _c(b, n, beta))
        terms.append(b.expand_to(tc, b.dims(n.inputs[2]), n.y))
    return [b.add(*terms)]


def _swap_last2(b: Builder, x: str, rank: int) -> str:
    return b.op("Transpose", x, perm=list(range(rank - 2)) + [rank - 1, rank - 2])


@vjp("MatMul")
def _vjp_matmul(b, n, gs):
    a, c = n.inputs
    ra, rc = b.rank(a, n), b.rank(c, n)
    a2 = b.unsqueeze(a, [0]) if ra == 1 else a  # 1-D operands as matrices (numpy rules)
    c2 = b.unsqueeze(c, [1]) if rc == 1 else c
    g2 = b.unsqueeze(gs[0], ([-2] if ra == 1 else []) + ([-1] if rc == 1 else [])) if (ra == 1 or rc == 1) else gs[0]
    y_dims = b.dims(n.y)
    g2_dims = None if y_dims is None else (y_dims[:-1] + [1] + y_dims[-1:] if ra == 1 else list(y_dims))
    if g2_dims is not None and rc == 1:
        g2_dims = g2_dims + [1]
    out = {}
    if 0 in n.active:
        ga = b.op("MatMul", g2, _swap_last2(b, c2, max(rc, 2)))
        ga_dims = None if g2_dims is None else g2_dims[:-1] + [b.dims(a)[-1]]
        out[0] = b.unbroadcast(ga, ga_dims, a, n)
    if 1 in n.active:
        gc = b.op("MatMul", _swap_last2(b, a2, max(ra, 2)), g2)
        gc_dims = None if g2_dims is None else g2_dims[:-2] + [b.dims(c)[0 if rc == 1 else -2], g2_dims[-1]]
        if rc == 1:
            gc, gc_dims = b.squeeze(gc, [-1]), gc_dims[:-1]
        out[1] = b.unbroadcast(gc, gc_dims, c, n)
    return out


@jvp("MatMul")
def _jvp_matmul(b, n, ts):
    a, c = n.inputs
    return [b.add(b.op("MatMul", ts[0], c) if ts[0] else None, b.op("MatMul", a, ts[1]) if ts[1] else None)]


# --- Einsum -----------------------------------------------------------------------------
def _einsum_terms(b: Builder, n: Node) -> tuple[list[str], str]:
    """The equation with ellipses spelled out as letters and the output made explicit."""
    eq = n.attr("equation").replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    letters = {c for c in eq if c.isalpha()}
    spare = [c for c in string.ascii_letters if c not in letters]
    ranks = [b.rank(x, n) if "..." in t else len(t) for t, x in zip(terms, n.inputs)]
    width = max([r - (len(t) - 3) for t, r in zip(terms, ranks) if "..." in t], default=0)
    ell = "".join(spare[:width])
    terms = [t.replace("...", ell[width - (r - (len(t) - 3)):]) if "..." in t else t for t, r in zip(terms, ranks)]
    if arrow:
        rhs = rhs.replace("...", ell)
    else:  # implicit output: the ellipsis, then the letters used once, sorted
        counts = Counter("".join(terms))
        rhs = ell + "".join(sorted(c for c in counts if counts[c] == 1 and c not in ell))
    return terms, rhs


@vjp("Einsum")
def _vjp_einsum(b, n, gs):
    terms, rhs = _einsum_terms(b, n)
    out = {}
    for k in n.active:
        term = terms[k]
        others = [i for i in range(len(terms)) if i != k]
        seen = set(rhs).union(*(terms[i] for i in others))
        unique = "".join(dict.fromkeys(term))
        keep = "".join(c for c in unique if c in seen)
        g = b.op("Einsum", gs[0], *(n.inputs[i] for i in others),
                 equation=",".join([rhs] + [terms[i] for i in others]) + "->" + keep)
        if keep != unique:  # letters summed only within this operand: the cotangent is constant along them
            missing = [c for c in unique if c not in seen]
            g = b.op("Expand", b.unsqueeze(g, [unique.index(c) for c in missing]), b.ivec(
                [b.dim(n.inputs[k], term.index(c)) for c in unique]))
        if unique != term:
            g = _embed_diagonals(b, n, g, unique, term, k)
        out[k] = _sum_broadcast_axes(b, n, g, terms, k)
    return out


def _embed_diagonals(b: Builder, n: Node, g: str, unique: str, term: str, k: int) -> str:
    """g (subscripts ``unique``) placed on the diagonals of an operand with repeated
    subscripts (``term``, e.g. 'ii'): each repeat is a fresh letter tied by an identity."""
    spare = iter(c for c in string.ascii_letters if c not in term)
    full, eyes, subs = [], [], []
    for axis, c in enumerate(term):
        if c in term[:axis]:
            d = next(spare)
            full.append(d)
            subs.append(c + d)
            size = b.dim(n.inputs[k], axis)
            if isinstance(size, int):
                eyes.append(b.const(np.eye(size), n.dtype))
            else:
                zeros = b.op("ConstantOfShape", b.ivec([size, size]),
                             value=helper.make_tensor("value", n.dtype, [1], [0.0]))
                eyes.append(b.op("EyeLike", zeros))
        else:
            full.append(c)
    return b.op("Einsum", g, *eyes, equation=",".join([unique] + subs) + "->" + "".join(full))


def _sum_broadcast_axes(b: Builder, n: Node, g: str, terms: list[str], k: int) -> str:
    """Sum g over the axes where operand k has size 1 and is broadcast (numpy einsum rules)."""
    dims = b.dims(n.inputs[k])
    if dims is None:
        return g
    axes = []
    for axis, (c, d) in enumerate(zip(terms[k], dims)):
        others = [(b.dims(x) or [None] * len(t))[t.index(c)] for i, (t, x) in enumerate(zip(terms, n.inputs))
                  if i != k and c in t]
        if d == 1 and any(o is not None and o != 1 for o in others):
            axes.append(axis)
    return b.reduce("ReduceSum", g, axes, keepdims=1) if axes else g


@jvp("Einsum")
def _jvp_einsum(b, n, ts):
    terms = [b.same(n, *[t if i == k else x for i, x in enumerate(n.inputs)]) for k, t in enumerate(ts)
             if t is not None]
    return [b.add(*terms)]


# --- Det: d det(X) / dX = cofactor matrix ---------------------------------------------
def _cofactors(b: Builder, n: Node) -> str:
    """C[..., i, j] = (-1)^(i+j) det(X without row i and column j): exact, singular X included."""
    rank = b.rank(n.x, n)
    size = b.dim(n.x, rank - 1)
    if not isinstance(size, int):
        raise n.unsupported("needs a static matrix size")
    if size == 1:
        return b.op("Add", b.op("Mul", n.x, b.scalar(0.0, n.dtype)), b.scalar(1.0, n.dtype))
    others = b.ints([[r for r in range(size) if r != i] for i in range(size)])  # (n, n-1)
    rows = b.op("Gather", n.x, others, axis=rank - 2)  # (..., i, n-1, n)
    minors = b.op("Gather", rows, others, axis=rank)  # (..., i, n-1, j, n-1)
    batch = list(range(rank - 2))
    minors = b.op("Transpose", minors, perm=batch + [rank - 2, rank, rank - 1, rank + 1])
    signs = (-1.0) ** np.add.outer(np.arange(size), np.arange(size))
    return b.op("Mul", b.op("Det", minors), b.const(signs, n.dtype))


@vjp("Det")
def _vjp_det(b, n, gs):
    rank = b.rank(n.x, n)
    return {0: b.op("Mul", b.unsqueeze(gs[0], [rank - 2, rank - 1]), _cofactors(b, n))}


@jvp("Det")
def _jvp_det(b, n, ts):
    rank = b.rank(n.x, n)
    return [b.reduce("ReduceSum", b.op("Mul", ts[0], _cofactors(b, n)), [rank - 2, rank - 1], keepdims=0)]
