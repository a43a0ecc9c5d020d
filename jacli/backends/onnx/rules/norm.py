"""Normalisation: batch, layer and instance normalisation."""
from __future__ import annotations


import numpy as np

from .conv import _bias_shape
from ..graph import Builder, Node
from .registry import JVP_RULES, VJP_RULES, _c, jvp, vjp

# --- normalisation ----------------------------------------------------------------------
def _lrn_terms(b: Builder, n: Node) -> tuple[str, str, float]:
    """LRN: y = x s^-beta, s = bias + alpha/size * (window sum over channels of x^2).
    Returns s^-beta, s^(-beta-1) and the constant 2 alpha beta / size."""
    size, alpha, beta = n.attr("size"), n.attr("alpha", 1e-4), n.attr("beta", 0.75)
    bias = n.attr("bias", 1.0)
    s = b.op("Add", _c(b, n, bias), b.op("Mul", _lrn_window(b, n, b.op("Mul", n.x, n.x), False),
                                         _c(b, n, alpha / size)))
    s_beta = b.op("Pow", s, _c(b, n, -beta))
    return s_beta, b.op("Div", s_beta, s), 2 * alpha * beta / size


def _lrn_window(b: Builder, n: Node, v: str, transpose: bool) -> str:
    """Sum of v over channels [c - (size-1)//2, c + size//2] (or the transposed window)."""
    size, rank = n.attr("size"), b.rank(n.x, n)
    lo, hi = (size - 1) // 2, size // 2
    if transpose:
        lo, hi = hi, lo
    kernel = b.const(np.ones([1, 1, size] + [1] * (rank - 2)), n.dtype)
    summed = b.op("Conv", b.unsqueeze(v, [1]), kernel, pads=[lo] + [0] * (rank - 2) + [hi] + [0] * (rank - 2))
    return b.squeeze(summed, [1])


@vjp("LRN")
def _vjp_lrn(b, n, gs):
    s_beta, s_beta1, k = _lrn_terms(b, n)
    back = _lrn_window(b, n, b.op("Mul", b.op("Mul", gs[0], n.x), s_beta1), True)
    return {0: b.op("Sub", b.op("Mul", gs[0], s_beta), b.op("Mul", b.op("Mul", n.x, back), _c(b, n, k)))}


@jvp("LRN")
def _jvp_lrn(b, n, ts):
    s_beta, s_beta1, k = _lrn_terms(b, n)
    fwd = _lrn_window(b, n, b.op("Mul", n.x, ts[0]), False)
    return [b.op("Sub", b.op("Mul", ts[0], s_beta),
                 b.op("Mul", b.op("Mul", b.op("Mul", n.x, s_beta1), fwd), _c(b, n, k)))]


def _batch_norm_scale(b: Builder, n: Node) -> str:
    if n.attr("training_mode", 0) or any(n.outputs[1:]):
        raise n.unsupported("runs in training mode (batch statistics)")
    scale, var = n.inputs[1], n.inputs[4]
    std = b.op("Sqrt", b.op("Add", var, _c(b, n, n.attr("epsilon", 1e-5))))
    return _bias_shape(b, b.op("Div", scale, std), b.rank(n.x, n))


VJP_RULES["BatchNormalization"] = lambda b, n, gs: {0: b.op("Mul", gs[0], _batch_norm_scale(b, n))}
JVP_RULES["BatchNormalization"] = lambda b, n, ts: [b.op("Mul", ts[0], _batch_norm_scale(b, n))]


def _standardized(b: Builder, n: Node, axes: list[int]) -> tuple[str, str]:
    """x_hat = (x - mean) r and r = 1/sqrt(var + eps) over ``axes`` (recomputed in x's precision)."""
    centered = b.op("Sub", n.x, b.reduce("ReduceMean", n.x, axes, keepdims=1))
    var = b.reduce("ReduceMean", b.op("Mul", centered, centered), axes, keepdims=1)
    r = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, _c(b, n, n.attr("epsilon", 1e-5)))))
    return b.op("Mul", centered, r), r


def _d_standardize(b: Builder, n: Node, v: str, axes: list[int], xhat: str, r: str) -> str:
    """(d x_hat/dx) applied to v; the map is symmetric so VJP and JVP share it:
    r (v - mean(v) - x_hat mean(x_hat v))."""
    mean_v = b.reduce("ReduceMean", v, axes, keepdims=1)
    mean_xv = b.reduce("ReduceMean", b.op("Mul", xhat, v), axes, keepdims=1)
    return b.op("Mul", r, b.op("Sub", b.op("Sub", v, mean_v), b.op("Mul", xhat, mean_xv)))


def _layer_norm_axes(b: Builder, n: Node) -> list[int]:
    rank = b.rank(n.x, n)
    return list(range(n.attr("axis", -1) % rank, rank))


@vjp("LayerNormalization")
def _vjp_layer_norm(b, n, gs):
    axes = _layer_norm_axes(b, n)
    xhat, r = _standardized(b, n, axes)
    g, y_dims, out = gs[0], b.dims(n.y), {}
    if 0 in n.active:
        out[0] = _d_standardize(b, n, b.op("Mul", g, n.inputs[1]), axes, xhat, r)
    if 1 in n.active:
        out[1] = b.unbroadcast(b.op("Mul", g, xhat), y_dims, n.inputs[1], n)
    if 2 in n.active:
        out[2] = b.unbroadcast(g, y_dims, n.inputs[2], n)
    return out


@jvp("LayerNormalization")
def _jvp_layer_norm(b, n, ts):
    axes = _layer_norm_axes(b, n)
    xhat, r = _standardized(b, n, axes)
    terms = [b.op("Mul", _d_standardize(b, n, ts[0], axes, xhat, r), n.inputs[1]) if ts[0] else None,
             b.op("Mul", xhat, ts[1]) if ts[1] else None]
    if len(ts) > 2 and ts[2]:
        terms.append(b.expand_to(ts[2], b.dims(n.inputs[2]), n.y))
    return [b.add(*terms)] + [None] * (len(n.outputs) - 1)


def _instance_norm(b: Builder, n: Node, v: str) -> str:
    rank = b.rank(n.x, n)
    axes = list(range(2, rank))
    xhat, r = _standardized(b, n, axes)
    return _d_standardize(b, n, b.op("Mul", v, _bias_shape(b, n.inputs[1], rank)), axes, xhat, r)


VJP_RULES["InstanceNormalization"] = lambda b, n, gs: {0: _instance_norm(b, n, gs[0])}
JVP_RULES["InstanceNormalization"] = lambda b, n, ts: [_instance_norm(b, n, ts[0])]
