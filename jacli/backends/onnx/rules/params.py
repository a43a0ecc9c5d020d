"""Derivatives with respect to the inputs that are usually parameters: Conv/ConvTranspose
weights, BatchNormalization/InstanceNormalization scale, bias and statistics, Clip bounds
and the Pad value. They are registered as separate entries of those operators (the drivers
sum them with the entries for the data inputs), used when a model has these as graph
inputs and ``--wrt`` names them (or leaves the default, every float input)."""
from __future__ import annotations

import numpy as np

from ..graph import Builder, Node
from .conv import _bias_shape, _conv_transpose_pads, _kernel_shape, _pad_spatial, _window, _Window
from .registry import _c, _mask, jvp, vjp


# --- convolution weights -------------------------------------------------------------------
def _weight_adjoint(b: Builder, n: Node, x: str, g: str, w: str, win, channels: int, out_channels: int,
                    batch) -> str:
    """The adjoint w.r.t. the weights ``w`` (O, C/G, *kernel) of ``Conv(x, w)`` (window
    ``win``, G groups) applied to ``g`` (N, O, *out): the window patches of x (a Conv with
    a one-hot kernel per window element) contracted with g over the batch and every
    output position."""
    kernel, k = win.kernel, len(win.kernel)
    groups = n.attr("group", 1)
    size = int(np.prod(kernel))
    padded = _pad_spatial(b, x, win.begin, win.end, None)
    planes = b.op("Reshape", padded, b.ints([-1, 1] + [0] * k))
    onehot = b.const(np.eye(size).reshape([size, 1] + list(kernel)), n.dtype)
    patches = b.op("Conv", planes, onehot, strides=win.strides, dilations=win.dilations)  # (N*C, K, *out)
    patches = b.op("Reshape", patches, b.ivec([batch, groups, (channels // groups) * size, -1]))
    grads = b.op("Reshape", g, b.ivec([batch, groups, out_channels // groups, -1]))
    per_sample = b.op("MatMul", grads, b.op("Transpose", patches, perm=[0, 1, 3, 2]))  # (N, G, O/G, C/G*K)
    return b.op("Reshape", b.reduce("ReduceSum", per_sample, [0], keepdims=0), b.shape(w))


def _channels(b: Builder, n: Node, v: str) -> int:
    dims = b.dims(v)
    if dims is None or len(dims) < 2 or not isinstance(dims[1], int):
        raise n.unsupported(f"needs the static channel count of '{v}' to differentiate its weights")
    return dims[1]


@vjp("Conv", inputs=(1,))
def _vjp_conv_weight(b, n, gs):
    win = _window(b, n, _kernel_shape(b, n))
    w = n.inputs[1]
    return {1: _weight_adjoint(b, n, n.x, gs[0], w, win, _channels(b, n, n.x), _channels(b, n, n.y), b.dim(n.x, 0))}


@jvp("Conv", "ConvTranspose", inputs=(1,))
def _jvp_conv_weight(b, n, ts):
    return [b.same(n, n.x, ts[1])]  # bilinear: the op on the weights' tangent, without the bias


@vjp("ConvTranspose", inputs=(1,))
def _vjp_conv_transpose_weight(b, n, gs):
    """<ConvTranspose(x, W), g> = <x, Conv(g, W)> over the uncropped output: the Conv weight
    adjoint with the roles of input and cotangent swapped."""
    kernel = _kernel_shape(b, n)
    k = len(kernel)
    begin, end = _conv_transpose_pads(b, n, kernel)
    strides, dilations = n.attr("strides") or [1] * k, n.attr("dilations") or [1] * k
    win = _Window(kernel, strides, dilations, begin, end)
    w = n.inputs[1]
    return {1: _weight_adjoint(b, n, gs[0], n.x, w, win, _channels(b, n, n.y), _channels(b, n, n.x), b.dim(n.x, 0))}


# --- normalisation parameters ----------------------------------------------------------
def _bn_terms(b: Builder, n: Node):
    rank = b.rank(n.x, n)
    scale, mean, var = (_bias_shape(b, n.inputs[i], rank) for i in (1, 3, 4))
    inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, _c(b, n, n.attr("epsilon", 1e-5)))))
    centered = b.op("Sub", n.x, mean)
    return rank, scale, inv, centered


def _check_inference(n: Node) -> None:
    if n.attr("training_mode", 0) or any(n.outputs[1:]):
        raise n.unsupported("runs in training mode (batch statistics)")


@vjp("BatchNormalization", inputs=(1, 2, 3, 4), outputs=(0,))
def _vjp_batch_norm_params(b, n, gs):
    """y = scale (x - mean) r + B with r = (var + eps)^-1/2."""
    _check_inference(n)
    rank, scale, inv, centered = _bn_terms(b, n)
    g, axes, out = gs[0], [0] + list(range(2, rank)), {}
    per = lambda v: b.reduce("ReduceSum", v, axes, keepdims=0)  # noqa: E731
    if 1 in n.active:
        out[1] = per(b.op("Mul", g, b.op("Mul", centered, inv)))
    if 2 in n.active:
        out[2] = per(g)
    if 3 in n.active:
        out[3] = b.op("Neg", per(b.op("Mul", g, b.op("Mul", scale, inv))))
    if 4 in n.active:
        cube = b.op("Mul", inv, b.op("Mul", inv, inv))
        out[4] = per(b.op("Mul", g, b.op("Mul", b.op("Mul", scale, centered), b.op("Mul", cube, _c(b, n, -0.5)))))
    return out


@jvp("BatchNormalization", inputs=(1, 2, 3, 4), outputs=(0,))
def _jvp_batch_norm_params(b, n, ts):
    _check_inference(n)
    rank, scale, inv, centered = _bn_terms(b, n)
    shaped = lambda i: _bias_shape(b, ts[i], rank)  # noqa: E731
    terms = []
    if ts[1]:
        terms.append(b.op("Mul", shaped(1), b.op("Mul", centered, inv)))
    if ts[2]:
        terms.append(b.expand_to(shaped(2), None, n.y))
    if ts[3]:
        terms.append(b.op("Neg", b.op("Mul", b.op("Mul", scale, inv), b.expand_to(shaped(3), None, n.y))))
    if len(ts) > 4 and ts[4]:
        cube = b.op("Mul", inv, b.op("Mul", inv, inv))
        terms.append(b.op("Mul", b.op("Mul", b.op("Mul", scale, centered), b.op("Mul", cube, _c(b, n, -0.5))),
                          shaped(4)))
    return [b.add(*terms)] + [None] * (len(n.outputs) - 1)


def _instance_xhat(b: Builder, n: Node) -> tuple[int, str]:
    from .norm import _standardized

    rank = b.rank(n.x, n)
    return rank, _standardized(b, n, list(range(2, rank)))[0]


@vjp("InstanceNormalization", inputs=(1, 2))
def _vjp_instance_norm_params(b, n, gs):
    rank, xhat = _instance_xhat(b, n)
    axes, out = [0] + list(range(2, rank)), {}
    if 1 in n.active:
        out[1] = b.reduce("ReduceSum", b.op("Mul", gs[0], xhat), axes, keepdims=0)
    if 2 in n.active:
        out[2] = b.reduce("ReduceSum", gs[0], axes, keepdims=0)
    return out


@jvp("InstanceNormalization", inputs=(1, 2))
def _jvp_instance_norm_params(b, n, ts):
    rank, xhat = _instance_xhat(b, n)
    terms = [b.op("Mul", xhat, _bias_shape(b, ts[1], rank)) if ts[1] else None,
             b.expand_to(_bias_shape(b, ts[2], rank), None, n.y) if ts[2] else None]
    return [b.add(*terms)]


# --- Clip bounds, Pad value ------------------------------------------------------------
def _clip_bound_masks(b: Builder, n: Node) -> dict[int, str]:
    """Where y is the lower (input 1) or upper (input 2) bound rather than x (x at a bound
    keeps the derivative, as the data rule does)."""
    masks = {}
    if n.input(1):
        masks[1] = _mask(b, n, b.op("Less", n.x, n.inputs[1]))
    if n.input(2):
        masks[2] = _mask(b, n, b.op("Greater", n.x, n.inputs[2]))
    return masks


@vjp("Clip", inputs=(1, 2))
def _vjp_clip_bounds(b, n, gs):
    masks = _clip_bound_masks(b, n)
    return {i: b.unbroadcast(b.op("Mul", gs[0], masks[i]), b.dims(n.y), n.inputs[i], n) for i in sorted(n.active)}


@jvp("Clip", inputs=(1, 2))
def _jvp_clip_bounds(b, n, ts):
    masks = _clip_bound_masks(b, n)
    return [b.add(*[b.op("Mul", masks[i], ts[i]) for i in (1, 2) if i < len(ts) and ts[i]])]


def _pad_border(b: Builder, n: Node) -> str:
    """1 on the positions Pad fills with its value, 0 on the copied ones."""
    if n.attr("mode", "constant") != "constant":
        raise n.unsupported(f"pads in mode '{n.attr('mode')}', which takes no value")
    inside = b.op("ConstantOfShape", b.shape(n.x), value=_one(n))
    operands = [inside, n.inputs[1]] + (["", n.inputs[3]] if n.input(3) else [])
    return b.op("Sub", _c(b, n, 1.0), b.op("Pad", *operands))


def _one(n: Node):
    from onnx import helper

    return helper.make_tensor("value", n.dtype, [1], [1.0])


@vjp("Pad", inputs=(2,))
def _vjp_pad_value(b, n, gs):
    total = b.reduce("ReduceSum", b.op("Mul", gs[0], _pad_border(b, n)), None, keepdims=0)
    return {2: b.reshape_like(total, n.inputs[2])}


@jvp("Pad", inputs=(2,))
def _jvp_pad_value(b, n, ts):
    return [b.op("Mul", _pad_border(b, n), ts[2])]
