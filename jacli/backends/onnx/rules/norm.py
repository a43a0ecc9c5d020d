"""Normalisation: batch, layer and instance normalisation."""
from __future__ import annotations


import numpy as np

from .conv import _bias_shape
from ..graph import Builder, Node
from .registry import _c, jvp, rule, vjp

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


@vjp("LRN", inputs=(0,))
def _vjp_lrn(b, n, gs):
    s_beta, s_beta1, k = _lrn_terms(b, n)
    back = _lrn_window(b, n, b.op("Mul", b.op("Mul", gs[0], n.x), s_beta1), True)
    return {0: b.op("Sub", b.op("Mul", gs[0], s_beta), b.op("Mul", b.op("Mul", n.x, back), _c(b, n, k)))}


@jvp("LRN", inputs=(0,))
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


rule("BatchNormalization", inputs=(0,), outputs=(0,), vjp=lambda b, n, gs: {0: b.op("Mul", gs[0], _batch_norm_scale(b, n))},
     jvp=lambda b, n, ts: [b.op("Mul", ts[0], _batch_norm_scale(b, n))])


def _standardized(b: Builder, n: Node, axes: list[int], x: str | None = None) -> tuple[str, str]:
    """x_hat = (x - mean) r and r = 1/sqrt(var + eps) over ``axes`` (recomputed in x's precision)."""
    x = x or n.x
    centered = b.op("Sub", x, b.reduce("ReduceMean", x, axes, keepdims=1))
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


def _per_element(b: Builder, n: Node, reduced: str) -> str:
    """1/D: the reduced tensor's size over x's."""
    return b.op("Div", b.op("Cast", b.op("Size", reduced), to=n.dtype), b.op("Cast", b.op("Size", n.x), to=n.dtype))


# LayerNormalization's outputs: Y = x_hat scale + bias, Mean (dMean/dx = 1/D) and InvStdDev
# r = (var + eps)^-1/2 (dr/dx = -r^2 x_hat / D), the last two with the normalised axes kept.
@vjp("LayerNormalization")
def _vjp_layer_norm(b, n, gs):
    axes = _layer_norm_axes(b, n)
    xhat, r = _standardized(b, n, axes)
    g, y_dims, out = gs[0], b.dims(n.y), {}
    g_mean, g_inv = (gs + [None, None])[1:3]
    if 0 in n.active:
        terms = [_d_standardize(b, n, b.op("Mul", g, n.inputs[1]), axes, xhat, r) if g else None]
        if g_mean or g_inv:
            per = _per_element(b, n, r)
            if g_mean:
                terms.append(b.op("Expand", b.op("Mul", g_mean, per), b.shape(n.x)))
            if g_inv:
                terms.append(b.op("Mul", xhat, b.op("Neg", b.op("Mul", b.op("Mul", r, r), b.op("Mul", g_inv, per)))))
        out[0] = b.add(*terms)
    for i in (1, 2):
        if i in n.active:
            gi = g if i == 2 or g is None else b.op("Mul", g, xhat)
            out[i] = b.zeros_like(n.inputs[i], n.dtype) if g is None else b.unbroadcast(gi, y_dims, n.inputs[i], n)
    return out


@jvp("LayerNormalization")
def _jvp_layer_norm(b, n, ts):
    axes = _layer_norm_axes(b, n)
    xhat, r = _standardized(b, n, axes)
    terms = [b.op("Mul", _d_standardize(b, n, ts[0], axes, xhat, r), n.inputs[1]) if ts[0] else None,
             b.op("Mul", xhat, ts[1]) if ts[1] else None]
    if len(ts) > 2 and ts[2]:
        terms.append(b.expand_to(ts[2], b.dims(n.inputs[2]), n.y))
    out = [b.add(*terms), None, None]
    wanted = [i for i in (1, 2) if i < len(n.outputs) and n.outputs[i]]
    if ts[0] and wanted:
        out[1] = b.reduce("ReduceMean", ts[0], axes, keepdims=1)
        inv = b.op("Mul", b.op("Mul", r, r), b.reduce("ReduceMean", b.op("Mul", xhat, ts[0]), axes, keepdims=1))
        out[2] = b.op("Neg", inv)
    elif wanted:  # only scale/bias vary: the statistics do not
        out[1], out[2] = (b.zeros_like(n.outputs[i], n.dtype) if i in wanted else None for i in (1, 2))
    return out[:len(n.outputs)]


def _instance_norm(b: Builder, n: Node, v: str) -> str:
    rank = b.rank(n.x, n)
    axes = list(range(2, rank))
    xhat, r = _standardized(b, n, axes)
    return _d_standardize(b, n, b.op("Mul", v, _bias_shape(b, n.inputs[1], rank)), axes, xhat, r)


rule("InstanceNormalization", inputs=(0,), vjp=lambda b, n, gs: {0: _instance_norm(b, n, gs[0])},
     jvp=lambda b, n, ts: [_instance_norm(b, n, ts[0])])


# --- GroupNormalization: standardised per (sample, group of C/G channels) --------------------
def _group_norm(b: Builder, n: Node, v: str, transpose: bool) -> str:
    """scale (per group before opset 21, per channel from 21) times the standardisation's
    derivative, symmetric, applied to v: D(S v) for the VJP, S D(v) for the JVP."""
    groups, rank = n.attr("num_groups"), b.rank(n.x, n)
    grouped = b.ints([0, groups, -1])
    xhat, r = _standardized(b, n, [2], b.op("Reshape", n.x, grouped))
    per_channel = b.opset >= 21
    scale = _bias_shape(b, n.inputs[1], rank) if per_channel else b.unsqueeze(n.inputs[1], [1])
    if transpose:
        u = b.op("Mul", v, scale) if per_channel else v
        u = b.op("Reshape", u, grouped)
        if not per_channel:
            u = b.op("Mul", u, scale)
        return b.reshape_like(_d_standardize(b, n, u, [2], xhat, r), n.x)
    d = _d_standardize(b, n, b.op("Reshape", v, grouped), [2], xhat, r)
    if not per_channel:
        d = b.op("Mul", d, scale)
    d = b.reshape_like(d, n.x)
    return b.op("Mul", d, scale) if per_channel else d


rule("GroupNormalization", inputs=(0,), vjp=lambda b, n, gs: {0: _group_norm(b, n, gs[0], True)},
     jvp=lambda b, n, ts: [_group_norm(b, n, ts[0], False)])


# --- RMSNormalization: y = x r scale, r = 1/sqrt(mean(x^2) + eps) over axis.. ---------------
def _rms(b: Builder, n: Node) -> tuple[list[int], str, str]:
    rank = b.rank(n.x, n)
    axes = list(range(n.attr("axis", -1) % rank, rank))
    ms = b.reduce("ReduceMean", b.op("Mul", n.x, n.x), axes, keepdims=1)
    r = b.op("Reciprocal", b.op("Sqrt", b.op("Add", ms, _c(b, n, n.attr("epsilon", 1e-5)))))
    return axes, r, b.op("Mul", n.x, r)


def _d_rms(b: Builder, n: Node, v: str, axes: list[int], r: str, y0: str) -> str:
    """d(x r)/dx applied to v, symmetric: r (v - y0 mean(y0 v))."""
    return b.op("Mul", r, b.op("Sub", v, b.op("Mul", y0, b.reduce("ReduceMean", b.op("Mul", y0, v), axes,
                                                                   keepdims=1))))


@vjp("RMSNormalization", inputs=(0, 1))
def _vjp_rms_norm(b, n, gs):
    axes, r, y0 = _rms(b, n)
    out = {}
    if 0 in n.active:
        out[0] = _d_rms(b, n, b.op("Mul", gs[0], n.inputs[1]), axes, r, y0)
    if 1 in n.active:
        out[1] = b.unbroadcast(b.op("Mul", gs[0], y0), b.dims(n.y), n.inputs[1], n)
    return out


@jvp("RMSNormalization", inputs=(0, 1))
def _jvp_rms_norm(b, n, ts):
    axes, r, y0 = _rms(b, n)
    terms = [b.op("Mul", _d_rms(b, n, ts[0], axes, r, y0), n.inputs[1]) if ts[0] else None,
             b.op("Mul", y0, ts[1]) if ts[1] else None]
    return [b.add(*terms)]


# --- LpNormalization: y = x / ||x||_p along axis (p = 1 or 2) ------------------------------
def _lp_norm(b: Builder, n: Node, v: str, transpose: bool) -> str:
    axis, p = n.attr("axis", -1), n.attr("p", 2)
    if p not in (1, 2):
        raise n.unsupported(f"with p={p} is not an ONNX LpNormalization")
    if axis < 0:
        axis %= b.rank(n.x, n)
    norm = (b.op("Sqrt", b.reduce("ReduceSum", b.op("Mul", n.x, n.x), [axis])) if p == 2
            else b.reduce("ReduceSum", b.op("Abs", n.x), [axis]))
    if p == 2:  # (v - y <y, v>) / ||x||, symmetric
        return b.op("Div", b.op("Sub", v, b.op("Mul", n.y, b.reduce("ReduceSum", b.op("Mul", n.y, v), [axis]))), norm)
    sign = b.op("Sign", n.x)  # J = (I - y sign^T) / ||x||_1
    a, c = (sign, n.y) if transpose else (n.y, sign)
    return b.op("Div", b.op("Sub", v, b.op("Mul", a, b.reduce("ReduceSum", b.op("Mul", c, v), [axis]))), norm)


rule("LpNormalization", inputs=(0,), vjp=lambda b, n, gs: {0: _lp_norm(b, n, gs[0], True)},
     jvp=lambda b, n, ts: [_lp_norm(b, n, ts[0], False)])


# --- MeanVarianceNormalization: y = (x - mean) / (std + 1e-9) over axes (ONNX's function) -----
def _mvn(b: Builder, n: Node, v: str) -> str:
    """Symmetric: (v - mean(v)) / s - c mean(c v) / (s^2 std), c = x - mean, s = std + 1e-9."""
    axes = n.attr("axes") or [0, 2, 3]
    rank = b.rank(n.x, n)
    axes = sorted(a % rank for a in axes)
    c = b.op("Sub", n.x, b.reduce("ReduceMean", n.x, axes, keepdims=1))
    std = b.op("Sqrt", b.reduce("ReduceMean", b.op("Mul", c, c), axes, keepdims=1))
    s = b.op("Add", std, _c(b, n, 1e-9))
    first = b.op("Div", b.op("Sub", v, b.reduce("ReduceMean", v, axes, keepdims=1)), s)
    second = b.op("Div", b.op("Mul", c, b.reduce("ReduceMean", b.op("Mul", c, v), axes, keepdims=1)),
                  b.op("Mul", b.op("Mul", s, s), std))
    return b.op("Sub", first, second)


rule("MeanVarianceNormalization", inputs=(0,), vjp=lambda b, n, gs: {0: _mvn(b, n, gs[0])},
     jvp=lambda b, n, ts: [_mvn(b, n, ts[0])])
