"""Convolution and pooling (and LRN, a windowed sum)."""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
from onnx import NodeProto, TensorProto, helper

from ..graph import Builder, Dim, Node
from ..wire import ADJOINT
from .registry import _mask, jvp, vjp

# --- convolution and pooling ------------------------------------------------------------
class _Window:
    """Geometry of a sliding-window op along its spatial axes (sizes are Dims)."""

    def __init__(self, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                 begin: Sequence[Dim], end: Sequence[Dim]):
        self.kernel, self.strides, self.dilations = list(kernel), list(strides), list(dilations)
        self.begin, self.end = list(begin), list(end)

    def extent(self, i: int) -> int:
        return (self.kernel[i] - 1) * self.dilations[i] + 1


def _kernel_shape(b: Builder, n: Node) -> list[int]:
    if n.attr("kernel_shape"):
        return list(n.attr("kernel_shape"))
    w_dims = b.dims(n.inputs[1])
    if w_dims is None or not all(isinstance(d, int) for d in w_dims[2:]):
        raise n.unsupported("needs a static kernel shape")
    return list(w_dims[2:])


def _window(b: Builder, n: Node, kernel: list[int]) -> _Window:
    """Window of Conv/MaxPool/AveragePool on n.x, with pads resolved as onnxruntime does
    (auto_pad SAME_*: total = (ceil(in/s) - 1) s + extent - in, the odd one at the end for
    SAME_UPPER, at the beginning for SAME_LOWER)."""
    k = len(kernel)
    strides, dilations = n.attr("strides") or [1] * k, n.attr("dilations") or [1] * k
    win = _Window(kernel, strides, dilations, [0] * k, [0] * k)
    auto_pad = n.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for i in range(k):
            size = b.dim(n.x, 2 + i)
            steps = b.idiv(b.iadd(size, strides[i] - 1), strides[i])
            total = b.imax(b.isub(b.iadd(b.imul(steps, strides[i]), win.extent(i) - strides[i]), size), 0)
            half = b.idiv(total, 2) if auto_pad == "SAME_UPPER" else b.idiv(b.iadd(total, 1), 2)
            win.begin[i], win.end[i] = half, b.isub(total, half)
    elif auto_pad in ("NOTSET", ""):
        pads = n.attr("pads") or [0] * (2 * k)
        win.begin, win.end = list(pads[:k]), list(pads[k:])
    return win


def _pad_spatial(b: Builder, x: str, begin: Sequence[Dim], end: Sequence[Dim], value: str | None) -> str:
    if all(isinstance(p, int) and p == 0 for p in list(begin) + list(end)):
        return x
    pads = b.ivec([0, 0, *begin, 0, 0, *end])
    return b.op("Pad", x, pads, value) if value else b.op("Pad", x, pads)


def _spatial(b: Builder, x: str, k: int) -> list[Dim]:
    return [b.dim(x, 2 + i) for i in range(k)]


# onnxruntime runs a grouped ConvTranspose as one small matrix product per sample and group:
# a strided 5x5 depthwise adjoint of 160 x 288 x 2 x 2 seeds took 9.4 ms (one thread), zeros
# spread into the seeds and a depthwise Conv 1.5 ms; 4.5 against 1.1 ms at 4 x 4 (96
# channels), but 3.7 against 4.6 at 8 x 8 and 2.6 against 3.2 at 16 x 16, where the Conv's
# work on the zeros costs more (Keras' MobileNetV3Small as ONNX at 16 samples: its five such
# ConvTransposes were 33% of the kernel time). The zeros go in by Pad (_spread_in): spread
# by a broadcast 0/1 mask (_spread_out) instead, EfficientNet-B0 took 339 against 298 ms
SPREAD_FIRST = 16


def _window_adjoint(b: Builder, g: str, w: str, sizes: list[Dim], outs: list[Dim], win: _Window,
                    group: int) -> str:
    """Adjoint (w.r.t. its input, of spatial ``sizes``) of ``Conv(., w)`` with window ``win``
    and output spatial sizes ``outs``, applied to g: a ConvTranspose, cropped or
    zero-extended to the input's size; at unit strides, with pads within the window and
    the adjoint kernel at hand (``_adjoint_weights``), the Conv with it instead (the same
    sums; onnxruntime's Conv kernels are several times faster than its ConvTranspose). A
    2-D 1x1 Conv of equal strides s and no pads: the Conv with the adjoint kernel, then
    zeros inserted (``_spread_out``). A strided 2-D grouped (depthwise) Conv whose output
    is at most ``SPREAD_FIRST`` pixels: zeros inserted into g first, then that Conv."""
    k = len(win.kernel)
    pads = win.begin + win.end
    within = all(isinstance(p, int) and 0 <= p < win.extent(i % k) for i, p in enumerate(pads))  # pads inside the window
    static = all(isinstance(d, int) for d in [*sizes, *outs])
    if win.strides == [1] * k and within:
        adjoint = _adjoint_weights(b, w, group)
        if adjoint:
            return b.op("Conv", g, adjoint, pads=[win.extent(i % k) - 1 - p for i, p in enumerate(pads)],
                        dilations=win.dilations, group=group if group != 1 else None)
    if (k == 2 and win.kernel == [1, 1] and len(set(win.strides)) == 1 and all(isinstance(p, int) and p == 0 for p in pads)
            and b.opset >= 13 and static
            and b.info.types.get(w) in (TensorProto.FLOAT, TensorProto.DOUBLE)
            and (adjoint := _adjoint_weights(b, w, group))):
        a = b.op("Conv", g, adjoint, group=group if group != 1 else None)
        return _spread_out(b, a, win.strides[0], outs, sizes, b.info.types[w])
    if (k == 2 and group > 1 and len(set(win.strides)) == 1 and static and outs[0] * outs[1] <= SPREAD_FIRST
            and within and b.opset >= 13 and (adjoint := _adjoint_weights(b, w, group))):
        # g with s-1 zeros between its values (length (out-1)s+1), then the unit-stride Conv
        # with the adjoint kernel: x_bar[i] = sum_j w[j] spread[i + begin - j*d]
        s = win.strides[0]
        lengths = [(out - 1) * s + 1 for out in outs]
        spread = _spread_in(b, g, s, outs, lengths)
        ends = [size - length + begin for size, length, begin in zip(sizes, lengths, win.begin)]
        return b.op("Conv", spread, adjoint, pads=[win.extent(i) - 1 - win.begin[i] for i in range(k)] + ends,
                    dilations=win.dilations, group=group)
    crop = []
    for i in range(k):
        size, out = sizes[i], outs[i]
        full = b.iadd(b.imul(b.isub(out, 1), win.strides[i]), win.extent(i))  # ConvTranspose length
        end = b.imax(win.end[i], b.isub(b.isub(full, size), win.begin[i]))  # >= full - size - begin
        crop.append((win.begin[i], end, b.isub(b.iadd(b.iadd(size, win.begin[i]), end), full)))
    attrs = dict(strides=win.strides, dilations=win.dilations, group=group if group != 1 else None)
    if all(isinstance(v, int) for c in crop for v in c):
        return b.op("ConvTranspose", g, w, pads=[c[0] for c in crop] + [c[1] for c in crop],
                    output_padding=[c[2] for c in crop], **attrs)
    full = b.op("ConvTranspose", g, w, **attrs)
    extended = _pad_spatial(b, full, [0] * k, [c[2] for c in crop], None)  # zero tail
    starts = [c[0] for c in crop]
    ends = [b.iadd(s, size) for s, size in zip(starts, sizes)]
    return b.op("Slice", extended, b.ivec(starts), b.ivec(ends), b.ints(range(2, 2 + k)))


def _spread_out(b: Builder, a: str, s: int, outs: list[int], sizes: list[int], dtype: int) -> str:
    """``a`` (N, C, h, w) with s-1 zeros inserted after each row and column, cropped to the
    spatial ``sizes`` (at most s*h, s*w): what a strided 1x1 ConvTranspose does after its
    matrix product. Each value is repeated over an s x s block (Resize, nearest) and the
    block times a constant 0/1 mask keeps its first. onnxruntime's ConvTranspose runs one
    small matrix product per sample: for 160 rows of Keras' ResNet50 as ONNX its six
    strided 1x1 adjoints took 640 of 2,740 ms of Conv-family kernel time (profiled)."""
    h, w = outs
    mask = np.zeros((1, 1, s * h, s * w), np.float32)
    mask[..., ::s, ::s] = 1
    up = b.op("Resize", a, "", b.const(np.array([1, 1, s, s], np.float32)), mode="nearest",
              coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    out = b.op("Mul", up, b.const(mask, dtype))
    if list(sizes) == [s * h, s * w]:
        return out
    return b.op("Slice", out, b.ints([0, 0]), b.ints(sizes), b.ints([2, 3]))


def _spread_in(b: Builder, g: str, s: int, outs: list[int], lengths: list[int]) -> str:
    """``g`` (N, C, h, w) with s-1 zeros after each row and column, cropped to ``lengths``
    (at most s*h, s*w): (N, C, h, 1, w, 1) padded to (N, C, h, s, w, s) and reshaped. A copy,
    no broadcast (onnxruntime's Mul by a (1, 1, sh, sw) mask runs a slow path on so short an
    inner axis: in EfficientNet-B0's graph its Muls took 597 against 363 ms)."""
    h, w = outs
    padded = b.op("Pad", b.unsqueeze(g, [3, 5]), b.ivec([0] * 6 + [0, 0, 0, s - 1, 0, s - 1]))
    spread = b.op("Reshape", padded, b.ivec([0, 0, h * s, w * s]))
    if list(lengths) == [h * s, w * s]:
        return spread
    return b.op("Slice", spread, b.ints([0, 0]), b.ints(lengths), b.ints([2, 3]))


def _adjoint_weights(b: Builder, w: str, group: int) -> str | None:
    """The adjoint kernel of ``w`` (``_adjoint_kernel``): a constant where ``w`` is one; where
    ``w`` is a large weight fed to the session (wire.py), an input of its own that the model
    feeds (``wire.ADJOINT``: computed once, beside the weight; transposing and flipping the
    kernel in the graph cost more per call than it saved). Else None (a ConvTranspose)."""
    weights = b.info.consts.get(w)
    if weights is not None:
        return b.const(_adjoint_kernel(weights, group), b.info.types.get(w, TensorProto.FLOAT))
    dims = b.dims(w)
    if w not in b.info.fed or dims is None or not all(isinstance(d, int) for d in dims) or dims[0] % group:
        return None
    c_out, per_group, *kernel = dims
    return b.fed_input(f"{ADJOINT}{group}:{w}", b.info.types[w], [group * per_group, c_out // group, *kernel])


def adjoint_input(name: str, weights) -> np.ndarray:
    """The value of the input ``_adjoint_weights`` named ``name``, from the model's ``weights``."""
    group, w = name.removeprefix(ADJOINT).split(":", 1)
    return _adjoint_kernel(np.asarray(weights[w]), int(group))


def _adjoint_kernel(w: np.ndarray, group: int) -> np.ndarray:
    """The kernel of Conv's adjoint at unit strides: per group, input and output channels
    swapped, the window flipped. (C_out, C_in/g, *k) -> (C_in, C_out/g, *k)."""
    c_out, per_group, *kernel = w.shape
    w = w.reshape(group, c_out // group, per_group, *kernel).swapaxes(1, 2)
    w = w.reshape(group * per_group, c_out // group, *kernel)
    return np.ascontiguousarray(w[(slice(None), slice(None)) + (slice(None, None, -1),) * len(kernel)])


def _bias_shape(b: Builder, v: str, rank: int) -> str:
    """A per-channel vector (C,) as (C, 1, ..., 1) for broadcasting against (N, C, ...)."""
    return b.unsqueeze(v, list(range(1, rank - 1)))


@vjp("Conv", inputs=(0, 2))
def _vjp_conv(b, n, gs):
    out = {}
    if 0 in n.active:
        win = _window(b, n, _kernel_shape(b, n))
        k = len(win.kernel)
        out[0] = _window_adjoint(b, gs[0], n.inputs[1], _spatial(b, n.x, k), _spatial(b, n.y, k), win,
                                 n.attr("group", 1))
    if 2 in n.active:
        out[2] = b.reduce("ReduceSum", gs[0], [0] + list(range(2, b.rank(n.y, n))), keepdims=0)
    return out


@jvp("Conv", "ConvTranspose", inputs=(0, 2))
def _jvp_conv(b, n, ts):
    terms = [b.same(n, ts[0], n.inputs[1]) if ts[0] else None]
    if len(ts) > 2 and ts[2]:
        terms.append(b.expand_to(_bias_shape(b, ts[2], b.rank(n.y, n)), None, n.y))
    return [b.add(*terms)]


def _conv_transpose_pads(b: Builder, n: Node, kernel: list[int]) -> tuple[list, list]:
    """Begin/end crop of ConvTranspose's full output, resolved as onnxruntime does: with
    output_shape or auto_pad SAME_* the total crop is split with the odd one at the end
    for SAME_UPPER and at the beginning otherwise (NOTSET included)."""
    k = len(kernel)
    auto_pad = n.attr("auto_pad", "NOTSET")
    if not n.attr("output_shape") and auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        pads = n.attr("pads") or [0] * (2 * k)
        return list(pads[:k]), list(pads[k:])
    strides, dilations = n.attr("strides") or [1] * k, n.attr("dilations") or [1] * k
    adj = n.attr("output_padding") or [0] * k
    begin, end = [], []
    for i in range(k):
        size, out = b.dim(n.x, 2 + i), b.dim(n.y, 2 + i)
        full = b.iadd(b.imul(b.isub(size, 1), strides[i]), adj[i] + (kernel[i] - 1) * dilations[i] + 1)
        total = b.imax(b.isub(full, out), 0)
        half = b.idiv(total, 2)
        small, large = half, b.isub(total, half)
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin, end


@vjp("ConvTranspose", inputs=(0, 2))
def _vjp_conv_transpose(b, n, gs):
    out = {}
    if 0 in n.active:
        kernel = _kernel_shape(b, n)
        k = len(kernel)
        begin, end = _conv_transpose_pads(b, n, kernel)
        attrs = dict(strides=n.attr("strides") or [1] * k, dilations=n.attr("dilations") or [1] * k,
                     group=n.attr("group", 1))
        if all(isinstance(p, int) for p in begin + end):
            out[0] = b.op("Conv", gs[0], n.inputs[1], pads=begin + end, **attrs)
        else:
            out[0] = b.op("Conv", _pad_spatial(b, gs[0], begin, end, None), n.inputs[1], **attrs)
    if 2 in n.active:
        out[2] = b.reduce("ReduceSum", gs[0], [0] + list(range(2, b.rank(n.y, n))), keepdims=0)
    return out


def _planes(b: Builder, v: str, like: str, k: int) -> str:
    """(N, C, *spatial) -> (N*C, 1, *spatial), spatial sizes taken from ``like``."""
    return b.op("Reshape", v, b.ivec([-1, 1] + _spatial(b, like, k)))


def _one_hot_kernel(b: Builder, n: Node, kernel: list[int]) -> str:
    """(K, 1, *kernel) with filter j picking the j-th window element (row-major)."""
    size = int(np.prod(kernel))
    return b.const(np.eye(size).reshape([size, 1] + kernel), n.dtype)


def _window_geometry(b: Builder, n: Node) -> tuple[_Window, list[int]]:
    kernel = list(n.attr("kernel_shape"))
    win = _window(b, n, kernel)
    # extend the end so that every output window (ceil_mode included) lies inside
    for i in range(len(kernel)):
        full = b.iadd(b.imul(b.isub(b.dim(n.y, 2 + i), 1), win.strides[i]), win.extent(i))
        win.end[i] = b.imax(win.end[i], b.isub(b.isub(full, b.dim(n.x, 2 + i)), win.begin[i]))
    return win, kernel


def _max_pool_indices(b: Builder, n: Node) -> str:
    """Flat positions in x of the maxima MaxPool selected: its Indices output (row-major,
    batch and channel included). When the model does not use it, the forward node is
    asked for it too, which changes nothing else it computes."""
    if len(n.outputs) > 1 and n.outputs[1]:
        if not n.attr("storage_order", 0):
            return n.outputs[1]
        twin = b.same(n, n.x, n_out=2)  # the model uses column-major indices: a row-major twin
        _drop_attribute(b.nodes[-1], "storage_order")
        return twin[1]
    name = b.fresh("MaxPool_indices")
    _drop_attribute(n.proto, "storage_order")
    n.proto.output.append(name)
    n.outputs.append(name)
    return name


def _drop_attribute(node: NodeProto, name: str) -> None:
    for attr in [a for a in node.attribute if a.name == name]:
        node.attribute.remove(attr)


def _overlapping(n: Node) -> bool:
    """Whether MaxPool's windows overlap (an element can be the maximum of two)."""
    kernel = n.attr("kernel_shape")
    strides, dilations = n.attr("strides") or [1] * len(kernel), n.attr("dilations") or [1] * len(kernel)
    return any(s < (k - 1) * d + 1 for k, s, d in zip(kernel, strides, dilations))


@vjp("MaxPool")
def _vjp_max_pool(b, n, gs):
    """Scatter g to the selected positions (ties: the first maximum in row-major window
    order, as onnxruntime's forward pass and torch pick it). Overlapping windows may pick
    an element twice, which needs ScatterElements(add) (opset 16); before that a
    mask-and-ConvTranspose construction is used."""
    overlapping = _overlapping(n)
    if overlapping and b.opset < 16:
        return {0: _max_pool_vjp_by_masks(b, n, gs[0])}
    zeros = b.op("ConstantOfShape", b.op("Reshape", b.op("Size", n.x), b.ints([1])),
                 value=helper.make_tensor("value", n.dtype, [1], [0.0]))
    flat = b.op("ScatterElements", zeros, b.op("Reshape", _max_pool_indices(b, n), b.ints([-1])),
                b.op("Reshape", gs[0], b.ints([-1])), axis=0, reduction="add" if overlapping else None)
    return {0: b.reshape_like(flat, n.x)}


@jvp("MaxPool")
def _jvp_max_pool(b, n, ts):
    picked = b.op("Gather", b.op("Reshape", ts[0], b.ints([-1])), _max_pool_indices(b, n))
    return [picked] + [None] * (len(n.outputs) - 1)


def _max_pool_vjp_by_masks(b: Builder, n: Node, g: str) -> str:
    """Opset < 16, overlapping windows: strided slices of the padded input (exact copies)
    compared with y give, per window element, where it is the first maximum; g routed by
    those masks goes back through the adjoint of the window extraction (a ConvTranspose
    with one-hot filters, float kernels only)."""
    if n.dtype == TensorProto.DOUBLE:
        raise n.unsupported("with overlapping windows before opset 16 has no double-precision reverse rule "
                            "(onnxruntime has no double ConvTranspose)")
    win, kernel = _window_geometry(b, n)
    k = len(kernel)
    lowest = b.scalar(float(np.finfo(helper.tensor_dtype_to_np_dtype(n.dtype)).min), n.dtype)
    padded = _pad_spatial(b, n.x, win.begin, win.end, lowest)
    outs = _spatial(b, n.y, k)
    routed, taken = [], None
    for offset in itertools.product(*(range(size) for size in kernel)):
        starts = [o * d for o, d in zip(offset, win.dilations)]
        ends = [b.iadd(b.imul(b.isub(out, 1), s), start + 1) for out, s, start in zip(outs, win.strides, starts)]
        view = b.op("Slice", padded, b.ints(starts), b.ivec(ends), b.ints(range(2, 2 + k)), b.ints(win.strides))
        hit = b.op("Equal", view, n.y)
        if taken is not None:
            hit = b.op("And", hit, b.op("Not", taken))
        taken = hit if taken is None else b.op("Or", taken, hit)
        routed.append(b.unsqueeze(b.op("Mul", g, _mask(b, n, hit)), [2]))
    planes = b.op("Reshape", b.op("Concat", *routed, axis=2), b.ivec([-1, len(routed)] + outs))  # (N*C, K, *out)
    grad = _window_adjoint(b, planes, _one_hot_kernel(b, n, kernel), _spatial(b, n.x, k), outs, win, 1)
    return b.reshape_like(grad, n.x)


@vjp("AveragePool")
def _vjp_average_pool(b, n, gs):
    # y = S(x) / D with S the zero-padded window sum; 1/D = AveragePool(1) / S(1) whatever
    # count_include_pad says, so the divisor is taken from onnxruntime itself.
    win, kernel = _window_geometry(b, n)
    k = len(kernel)
    ones_k = b.const(np.ones([1, 1] + kernel), n.dtype)
    ones_x = b.op("ConstantOfShape", b.ivec([1, 1] + _spatial(b, n.x, k)),
                  value=helper.make_tensor("value", n.dtype, [1], [1.0]))
    counts = b.op("Conv", _pad_spatial(b, ones_x, win.begin, win.end, None), ones_k,
                  strides=win.strides, dilations=win.dilations)
    scale = b.op("Div", b.same(n, ones_x), counts)
    routed = b.op("Mul", _planes(b, gs[0], n.y, k), scale)
    grad = _window_adjoint(b, routed, ones_k, _spatial(b, n.x, k), _spatial(b, n.y, k), win, 1)
    return {0: b.reshape_like(grad, n.x)}


@jvp("AveragePool", "GlobalAveragePool")
def _jvp_linear_pool(b, n, ts):
    return [b.same(n, ts[0])]


@vjp("GlobalAveragePool")
def _vjp_global_average_pool(b, n, gs):
    per_element = b.op("Div", b.op("Cast", b.op("Size", n.y), to=n.dtype), b.op("Cast", b.op("Size", n.x), to=n.dtype))
    return {0: b.op("Expand", b.op("Mul", gs[0], per_element), b.shape(n.x))}


def _global_max_weights(b: Builder, n: Node) -> tuple[str, list[int]]:
    axes = list(range(2, b.rank(n.x, n)))
    mask = b.op("Cast", b.op("Equal", n.x, n.y), to=n.dtype)
    return b.op("Div", mask, b.reduce("ReduceSum", mask, axes, keepdims=1)), axes


@vjp("GlobalMaxPool")
def _vjp_global_max_pool(b, n, gs):
    w, _ = _global_max_weights(b, n)
    return {0: b.op("Mul", gs[0], w)}


@jvp("GlobalMaxPool")
def _jvp_global_max_pool(b, n, ts):
    w, axes = _global_max_weights(b, n)
    return [b.reduce("ReduceSum", b.op("Mul", ts[0], w), axes, keepdims=1)]


# --- LpPool: y = S(|x|^p)^(1/p), S the zero-padded window sum ------------------------------
# dy/dx_k = y^(1-p) |x_k|^(p-1) sign(x_k) for each window holding x_k (0 where y = 0).
def _lp_pool_parts(b: Builder, n: Node) -> tuple[str, str, _Window, list[int]]:
    p = n.attr("p", 2)
    x, y = n.x, n.y
    if p == 1:
        w = b.op("Sign", x)
    elif p == 2:
        w = x
    else:
        w = b.op("Mul", b.op("Sign", x), b.op("Pow", b.op("Abs", x), b.scalar(p - 1.0, n.dtype)))
    zero = b.scalar(0.0, n.dtype)
    if p == 1:
        inv = b.op("Add", b.op("Mul", y, zero), b.scalar(1.0, n.dtype))
    else:
        inv = b.op("Where", b.op("Equal", y, zero), zero, b.op("Pow", y, b.scalar(1.0 - p, n.dtype)))
    win, kernel = _window_geometry(b, n)
    return w, inv, win, kernel


@vjp("LpPool", inputs=(0,))
def _vjp_lp_pool(b, n, gs):
    w, inv, win, kernel = _lp_pool_parts(b, n)
    k = len(kernel)
    ones_k = b.const(np.ones([1, 1] + kernel), n.dtype)
    routed = _planes(b, b.op("Mul", gs[0], inv), n.y, k)
    back = _window_adjoint(b, routed, ones_k, _spatial(b, n.x, k), _spatial(b, n.y, k), win, 1)
    return {0: b.op("Mul", b.reshape_like(back, n.x), w)}


@jvp("LpPool", inputs=(0,))
def _jvp_lp_pool(b, n, ts):
    w, inv, win, kernel = _lp_pool_parts(b, n)
    k = len(kernel)
    ones_k = b.const(np.ones([1, 1] + kernel), n.dtype)
    planes = _pad_spatial(b, _planes(b, b.op("Mul", ts[0], w), n.x, k), win.begin, win.end, None)
    summed = b.op("Conv", planes, ones_k, strides=win.strides, dilations=win.dilations)
    return [b.op("Mul", b.reshape_like(summed, n.y), inv)]
