"""Elementwise operators: unary activations and functions, and broadcasting binary /
variadic arithmetic."""
from __future__ import annotations

import math

import numpy as np

from ..graph import Builder, Node
from .registry import _blend, _broadcast_dims, _c, _mask, _positive, jvp, unary, vjp

@unary("Identity")
def _d_identity(b, n, v):
    return v


@unary("Neg")
def _d_neg(b, n, v):
    return b.op("Neg", v)


@unary("Abs")
def _d_abs(b, n, v):
    return b.op("Mul", v, b.op("Sign", n.x))


@unary("Sqrt")
def _d_sqrt(b, n, v):
    return b.op("Div", b.op("Mul", v, _c(b, n, 0.5)), n.y)


@unary("Exp")
def _d_exp(b, n, v):
    return b.op("Mul", v, n.y)


@unary("Log")
def _d_log(b, n, v):
    return b.op("Div", v, n.x)


@unary("Reciprocal")
def _d_reciprocal(b, n, v):
    return b.op("Neg", b.op("Mul", v, b.op("Mul", n.y, n.y)))


@unary("Relu")
def _d_relu(b, n, v):
    return b.op("Mul", v, _positive(b, n))


@unary("LeakyRelu")
def _d_leaky_relu(b, n, v):
    return b.op("Mul", v, _blend(b, n, _positive(b, n), _c(b, n, 1.0), _c(b, n, n.attr("alpha", 0.01))))


@unary("Elu")
def _d_elu(b, n, v):
    negative = b.op("Add", n.y, _c(b, n, n.attr("alpha", 1.0)))  # alpha*exp(x) for x <= 0
    return b.op("Mul", v, _blend(b, n, _positive(b, n), _c(b, n, 1.0), negative))


@unary("Selu")
def _d_selu(b, n, v):
    alpha, gamma = n.attr("alpha", 1.67326319217681884765625), n.attr("gamma", 1.05070102214813232421875)
    negative = b.op("Add", n.y, _c(b, n, alpha * gamma))  # gamma*alpha*exp(x) for x <= 0
    return b.op("Mul", v, _blend(b, n, _positive(b, n), _c(b, n, gamma), negative))


@unary("Sigmoid")
def _d_sigmoid(b, n, v):
    return b.op("Mul", v, b.op("Mul", n.y, b.op("Sub", _c(b, n, 1.0), n.y)))


@unary("HardSigmoid")
def _d_hard_sigmoid(b, n, v):
    inside = _mask(b, n, b.op("And", b.op("Greater", n.y, _c(b, n, 0.0)), b.op("Less", n.y, _c(b, n, 1.0))))
    return b.op("Mul", v, b.op("Mul", inside, _c(b, n, n.attr("alpha", 0.2))))


@unary("HardSwish")
def _d_hard_swish(b, n, v):
    # y = x * clip(u, 0, 1) with u = x/6 + 1/2; dy/dx = 0 (u < 0), 2u - 1/2 (u <= 1), 1 (u > 1)
    u = b.op("Add", b.op("Mul", n.x, _c(b, n, 1.0 / 6.0)), _c(b, n, 0.5))
    mid = b.op("Sub", b.op("Add", u, u), _c(b, n, 0.5))
    above = _mask(b, n, b.op("Greater", u, _c(b, n, 1.0)))
    inside = b.op("Mul", mid, _mask(b, n, b.op("Not", b.op("Less", u, _c(b, n, 0.0)))))
    slope = _blend(b, n, above, _c(b, n, 1.0), inside)
    return b.op("Mul", v, slope)


@unary("Tanh")
def _d_tanh(b, n, v):
    return b.op("Mul", v, b.op("Sub", _c(b, n, 1.0), b.op("Mul", n.y, n.y)))


@unary("Softplus")
def _d_softplus(b, n, v):
    return b.op("Mul", v, b.op("Sigmoid", n.x))


@unary("Softsign")
def _d_softsign(b, n, v):
    d = b.op("Add", _c(b, n, 1.0), b.op("Abs", n.x))
    return b.op("Div", v, b.op("Mul", d, d))


@unary("Erf")
def _d_erf(b, n, v):
    e = b.op("Exp", b.op("Neg", b.op("Mul", n.x, n.x)))
    return b.op("Mul", v, b.op("Mul", e, _c(b, n, 2.0 / math.sqrt(math.pi))))


@unary("Sin")
def _d_sin(b, n, v):
    return b.op("Mul", v, b.op("Cos", n.x))


@unary("Cos")
def _d_cos(b, n, v):
    return b.op("Neg", b.op("Mul", v, b.op("Sin", n.x)))


@unary("Gelu")
def _d_gelu(b, n, v):
    x = n.x
    if n.attr("approximate", "none") == "tanh":
        # y = x/2 (1 + tanh u), u = k (x + c x^3); y' = (1 + tanh u)/2 + x/2 (1 - tanh^2 u) k (1 + 3c x^2)
        k, c = math.sqrt(2.0 / math.pi), 0.044715
        x2 = b.op("Mul", x, x)
        u = b.op("Mul", b.op("Mul", x, b.op("Add", _c(b, n, 1.0), b.op("Mul", x2, _c(b, n, c)))), _c(b, n, k))
        th = b.op("Tanh", u)
        du = b.op("Mul", b.op("Add", _c(b, n, 1.0), b.op("Mul", x2, _c(b, n, 3 * c))), _c(b, n, k))
        sech2 = b.op("Sub", _c(b, n, 1.0), b.op("Mul", th, th))
        second = b.op("Mul", b.op("Mul", x, sech2), du)
        slope = b.op("Mul", b.op("Add", b.op("Add", _c(b, n, 1.0), th), second), _c(b, n, 0.5))
    else:
        # y = x Phi(x); y' = Phi(x) + x phi(x)
        cdf = b.op("Mul", b.op("Add", _c(b, n, 1.0), b.op("Erf", b.op("Mul", x, _c(b, n, 1 / math.sqrt(2))))),
                   _c(b, n, 0.5))
        pdf = b.op("Mul", b.op("Exp", b.op("Mul", b.op("Mul", x, x), _c(b, n, -0.5))),
                   _c(b, n, 1 / math.sqrt(2 * math.pi)))
        slope = b.op("Add", cdf, b.op("Mul", x, pdf))
    return b.op("Mul", v, slope)


@vjp("Dropout", inputs=(0,))
def _vjp_dropout(b, n, gs):
    _check_inference_dropout(n)
    return {0: gs[0]}


@jvp("Dropout", inputs=(0,))
def _jvp_dropout(b, n, ts):
    _check_inference_dropout(n)
    return [ts[0]] + [None] * (len(n.outputs) - 1)


def _check_inference_dropout(n: Node) -> None:
    if n.input(2) is not None:
        mode = n.const(2)
        if mode is None or bool(mode):
            raise n.unsupported("runs in training mode (random mask)")


@vjp("Cast", "CastLike")
def _vjp_cast(b, n, gs):
    return {0: b.op("Cast", gs[0], to=b.info.types.get(n.x, n.dtype))}


@jvp("Cast", "CastLike")
def _jvp_cast(b, n, ts):
    return [b.op("Cast", ts[0], to=b.info.types.get(n.y, n.dtype))]


# --- elementwise binary / variadic with broadcasting -----------------------------------
@vjp("Add", "Sub", "Sum")
def _vjp_add(b, n, gs):
    out = {}
    for i in n.active:
        gi = b.unbroadcast(gs[0], b.dims(n.y), n.inputs[i], n)
        out[i] = b.op("Neg", gi) if n.op_type == "Sub" and i == 1 else gi
    return out


@jvp("Add", "Sub", "Sum")
def _jvp_add(b, n, ts):
    terms = [b.op("Neg", t) if n.op_type == "Sub" and i == 1 else t for i, t in enumerate(ts) if t is not None]
    if len(terms) == 1:
        (i,) = [i for i, t in enumerate(ts) if t is not None]
        return [b.expand_to(terms[0], b.dims(n.inputs[i]), n.y)]
    return [b.expand_to(b.add(*terms), b.dims(n.y), n.y)]


@vjp("Mean")
def _vjp_mean(b, n, gs):
    g = b.op("Mul", gs[0], _c(b, n, 1.0 / len(n.inputs)))
    return {i: b.unbroadcast(g, b.dims(n.y), n.inputs[i], n) for i in n.active}


@jvp("Mean")
def _jvp_mean(b, n, ts):
    (t,) = _jvp_add(b, n, ts)
    return [b.op("Mul", t, _c(b, n, 1.0 / len(n.inputs)))]


@vjp("Mul")
def _vjp_mul(b, n, gs):
    a, c = n.inputs
    return {i: b.unbroadcast(b.op("Mul", gs[0], c if i == 0 else a), b.dims(n.y), n.inputs[i], n) for i in n.active}


@jvp("Mul")
def _jvp_mul(b, n, ts):
    a, c = n.inputs
    # each term already has the broadcast shape: t_a * c ~ (a, c), a * t_c ~ (a, c)
    return [b.add(b.op("Mul", ts[0], c) if ts[0] else None, b.op("Mul", a, ts[1]) if ts[1] else None)]


@vjp("Div")
def _vjp_div(b, n, gs):
    a, c = n.inputs
    out = {}
    if 0 in n.active:
        out[0] = b.unbroadcast(b.op("Div", gs[0], c), b.dims(n.y), a, n)
    if 1 in n.active:
        out[1] = b.unbroadcast(b.op("Neg", b.op("Div", b.op("Mul", gs[0], n.y), c)), b.dims(n.y), c, n)
    return out


@jvp("Div")
def _jvp_div(b, n, ts):
    a, c = n.inputs
    terms = [ts[0], b.op("Neg", b.op("Mul", n.y, ts[1])) if ts[1] else None]
    return [b.op("Div", b.add(*terms), c)]


def _pow_partials(b: Builder, n: Node) -> dict[int, str]:
    """d(a**c)/da = c a**(c-1) (0 where c == 0) and d/dc = y log a (0 where a == 0, c >= 0)."""
    a, c = n.inputs
    zero = _c(b, n, 0.0)
    cf = c if b.info.types.get(c) == n.dtype else b.op("Cast", c, to=n.dtype)
    out = {}
    if 0 in n.active:
        da = b.op("Mul", cf, b.op("Pow", a, b.op("Sub", cf, _c(b, n, 1.0))))
        exponent = n.const(1)
        if exponent is None or not np.all(exponent != 0):
            da = b.op("Where", b.op("Equal", cf, zero), zero, da)
        out[0] = da
    if 1 in n.active:
        at_zero = b.op("And", b.op("Equal", a, zero), b.op("Not", b.op("Less", cf, zero)))
        out[1] = b.op("Where", at_zero, zero, b.op("Mul", n.y, b.op("Log", a)))
    return out


@vjp("Pow")
def _vjp_pow(b, n, gs):
    return {i: b.unbroadcast(b.op("Mul", gs[0], d), b.dims(n.y), n.inputs[i], n)
            for i, d in _pow_partials(b, n).items()}


@jvp("Pow")
def _jvp_pow(b, n, ts):
    return [b.add(*[b.op("Mul", ts[i], d) for i, d in _pow_partials(b, n).items()])]


def _selection_weights(b: Builder, n: Node) -> list[str]:
    """Max/Min: weight of each operand in the result (ties split evenly)."""
    if len(n.inputs) == 1:
        return [_c(b, n, 1.0)]
    masks = [b.op("Cast", b.op("Equal", x, n.y), to=n.dtype) for x in n.inputs]
    count = b.op("Sum", *masks)
    return [b.op("Div", m, count) for m in masks]


@vjp("Max", "Min")
def _vjp_max(b, n, gs):
    w = _selection_weights(b, n)
    return {i: b.unbroadcast(b.op("Mul", gs[0], w[i]), b.dims(n.y), n.inputs[i], n) for i in n.active}


@jvp("Max", "Min")
def _jvp_max(b, n, ts):
    w = _selection_weights(b, n)
    terms = [b.op("Mul", t, w[i]) for i, t in enumerate(ts) if t is not None]
    return [b.add(*terms) if len(n.inputs) > 1 else terms[0]]  # weights are shaped like y


@vjp("Where")
def _vjp_where(b, n, gs):
    m = _mask(b, n, n.inputs[0])
    out = {}
    if 1 in n.active:
        out[1] = b.unbroadcast(b.op("Mul", gs[0], m), b.dims(n.y), n.inputs[1], n)
    if 2 in n.active:
        out[2] = b.unbroadcast(b.op("Mul", gs[0], b.op("Sub", _c(b, n, 1.0), m)), b.dims(n.y), n.inputs[2], n)
    return out


@jvp("Where")
def _jvp_where(b, n, ts):
    m = _mask(b, n, n.inputs[0])
    terms = [b.op("Mul", ts[1], m) if ts[1] else None,
             b.op("Mul", ts[2], b.op("Sub", _c(b, n, 1.0), m)) if ts[2] else None]
    dims = [b.dims(name) for name, t in zip(n.inputs, [1] + ts[1:]) if t is not None]
    return [b.expand_to(b.add(*terms), _broadcast_dims(dims), n.y)]


@vjp("PRelu")
def _vjp_prelu(b, n, gs):
    x, slope = n.inputs
    pos, g = _positive(b, n), gs[0]
    out = {}
    if 0 in n.active:
        out[0] = b.op("Mul", g, _blend(b, n, pos, _c(b, n, 1.0), slope))
    if 1 in n.active:
        negative = b.op("Sub", _c(b, n, 1.0), pos)
        out[1] = b.unbroadcast(b.op("Mul", b.op("Mul", g, x), negative), b.dims(n.y), slope, n)
    return out


@jvp("PRelu")
def _jvp_prelu(b, n, ts):
    x, slope = n.inputs
    pos = _positive(b, n)
    terms = [b.op("Mul", ts[0], _blend(b, n, pos, _c(b, n, 1.0), slope)) if ts[0] else None,
             b.op("Mul", b.op("Mul", x, ts[1]), b.op("Sub", _c(b, n, 1.0), pos)) if ts[1] else None]
    return [b.add(*terms)]


def _clip_mask(b: Builder, n: Node) -> str | None:
    """Where Clip passes the derivative: lo <= x <= hi (inclusive, as torch.clamp)."""
    lo = n.input(1) or (_c(b, n, n.attr("min")) if "min" in n.attrs else None)
    hi = n.input(2) or (_c(b, n, n.attr("max")) if "max" in n.attrs else None)
    parts = [b.op("Not", b.op("Less", n.x, lo)) if lo else None, b.op("Not", b.op("Greater", n.x, hi)) if hi else None]
    parts = [p for p in parts if p]
    if not parts:
        return None
    return _mask(b, n, parts[0] if len(parts) == 1 else b.op("And", *parts))


@vjp("Clip", inputs=(0,))
def _vjp_clip(b, n, gs):
    mask = _clip_mask(b, n)
    return {0: gs[0] if mask is None else b.op("Mul", gs[0], mask)}


@jvp("Clip", inputs=(0,))
def _jvp_clip(b, n, ts):
    mask = _clip_mask(b, n)
    return [ts[0] if mask is None else b.op("Mul", ts[0], mask)]


# --- more activations and functions --------------------------------------------------
@unary("Mish")
def _d_mish(b, n, v):
    # y = x tanh(softplus(x)); y' = tanh(sp) + x sigmoid(x) (1 - tanh^2(sp))
    th = b.op("Tanh", b.op("Softplus", n.x))
    sech2 = b.op("Sub", _c(b, n, 1.0), b.op("Mul", th, th))
    return b.op("Mul", v, b.op("Add", th, b.op("Mul", b.op("Mul", n.x, b.op("Sigmoid", n.x)), sech2)))


@unary("Swish")
def _d_swish(b, n, v):
    # y = x s, s = sigmoid(alpha x); y' = s + alpha x s (1 - s)
    alpha = n.attr("alpha", 1.0)
    s = b.op("Sigmoid", b.op("Mul", n.x, _c(b, n, alpha)))
    ax = b.op("Mul", n.x, _c(b, n, alpha))
    return b.op("Mul", v, b.op("Add", s, b.op("Mul", b.op("Mul", ax, s), b.op("Sub", _c(b, n, 1.0), s))))


@unary("Celu")
def _d_celu(b, n, v):
    # y' = 1 for x > 0, exp(x / alpha) for x <= 0 (= y / alpha + 1 there)
    negative = b.op("Add", b.op("Mul", n.y, _c(b, n, 1.0 / n.attr("alpha", 1.0))), _c(b, n, 1.0))
    return b.op("Mul", v, _blend(b, n, _positive(b, n), _c(b, n, 1.0), negative))


@unary("ThresholdedRelu")
def _d_thresholded_relu(b, n, v):
    return b.op("Mul", v, _mask(b, n, b.op("Greater", n.x, _c(b, n, n.attr("alpha", 1.0)))))


@unary("Shrink")
def _d_shrink(b, n, v):
    lambd = n.attr("lambd", 0.5)
    outside = b.op("Or", b.op("Greater", n.x, _c(b, n, lambd)), b.op("Less", n.x, _c(b, n, -lambd)))
    return b.op("Mul", v, _mask(b, n, outside))


@unary("Tan")
def _d_tan(b, n, v):
    return b.op("Mul", v, b.op("Add", _c(b, n, 1.0), b.op("Mul", n.y, n.y)))


def _one_minus_x2(b: Builder, n: Node, sign: float = -1.0) -> str:
    """1 - x^2, or x^2 - 1 with ``sign=1``."""
    return b.op("Add", _c(b, n, -sign), b.op("Mul", b.op("Mul", n.x, n.x), _c(b, n, sign)))


@unary("Asin")
def _d_asin(b, n, v):
    return b.op("Div", v, b.op("Sqrt", _one_minus_x2(b, n)))


@unary("Acos")
def _d_acos(b, n, v):
    return b.op("Neg", b.op("Div", v, b.op("Sqrt", _one_minus_x2(b, n))))


@unary("Atan")
def _d_atan(b, n, v):
    return b.op("Div", v, b.op("Add", _c(b, n, 1.0), b.op("Mul", n.x, n.x)))


@unary("Sinh")
def _d_sinh(b, n, v):
    return b.op("Mul", v, b.op("Cosh", n.x))


@unary("Cosh")
def _d_cosh(b, n, v):
    return b.op("Mul", v, b.op("Sinh", n.x))


@unary("Asinh")
def _d_asinh(b, n, v):
    return b.op("Div", v, b.op("Sqrt", b.op("Add", b.op("Mul", n.x, n.x), _c(b, n, 1.0))))


@unary("Acosh")
def _d_acosh(b, n, v):
    return b.op("Div", v, b.op("Sqrt", _one_minus_x2(b, n, 1.0)))


@unary("Atanh")
def _d_atanh(b, n, v):
    return b.op("Div", v, _one_minus_x2(b, n))


def _mod_quotient(b: Builder, n: Node) -> str:
    """The integer q of y = a - q b: trunc(a / b) with fmod=1 (C fmod), floor(a / b) with
    fmod=0 (Python's %, floats from Mod-28 on), read back exactly as round((a - y) / b).
    dy/da = 1, dy/db = -q (torch.fmod's and torch.remainder's derivatives)."""
    a, c = n.inputs
    return b.op("Round", b.op("Div", b.op("Sub", a, n.y), c))


@vjp("Mod", inputs=(0, 1))
def _vjp_mod(b, n, gs):
    q = _mod_quotient(b, n)
    out = {}
    if 0 in n.active:
        out[0] = b.unbroadcast(gs[0], b.dims(n.y), n.inputs[0], n)
    if 1 in n.active:
        out[1] = b.unbroadcast(b.op("Neg", b.op("Mul", gs[0], q)), b.dims(n.y), n.inputs[1], n)
    return out


@jvp("Mod", inputs=(0, 1))
def _jvp_mod(b, n, ts):
    q = _mod_quotient(b, n)
    terms = [b.expand_to(ts[0], b.dims(n.inputs[0]), n.y) if ts[0] else None,
             b.op("Neg", b.op("Mul", ts[1], q)) if ts[1] else None]
    return [b.add(*terms)]
