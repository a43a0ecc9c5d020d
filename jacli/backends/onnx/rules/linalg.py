"""Linear algebra: Gemm and MatMul."""
from __future__ import annotations


from ..graph import Builder
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
