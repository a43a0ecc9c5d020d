"""The model's function in double precision, for finite differences."""
from __future__ import annotations

import itertools
import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...errors import UnsupportedError
from .graph import FLOAT_TYPES, _node_inputs, _prepare
from .wire import NARROW

# =====================================================================================
# float64
# =====================================================================================
_DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype"}


def _to_double_tensor(t: TensorProto) -> TensorProto:
    if t.data_type not in FLOAT_TYPES or t.data_type == TensorProto.DOUBLE:
        return t
    return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name)


def _graph_to_double(graph: onnx.GraphProto) -> None:
    for vi in itertools.chain(graph.input, graph.output, graph.value_info):
        if vi.type.tensor_type.elem_type in FLOAT_TYPES:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    for i, t in enumerate(graph.initializer):
        graph.initializer[i].CopyFrom(_to_double_tensor(t))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                attr.t.CopyFrom(_to_double_tensor(attr.t))
            elif attr.type == onnx.AttributeProto.GRAPH:
                _graph_to_double(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _graph_to_double(g)
            elif attr.name == _DTYPE_ATTRS.get(node.op_type) and attr.i in FLOAT_TYPES:
                attr.i = TensorProto.DOUBLE
        if node.op_type == "Constant":
            for attr in list(node.attribute):
                if attr.name in ("value_float", "value_floats"):
                    value = np.array(helper.get_attribute_value(attr), np.float64)
                    node.attribute.remove(attr)
                    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))


def to_float64(model: onnx.ModelProto, weights=()) -> onnx.ModelProto:
    """The same function in double precision (float inputs, outputs, initializers,
    constants and casts made double). The inputs named in ``weights`` keep their type, as
    ``NARROW + name``, and are cast just before their first use. Raises UnsupportedError
    when onnxruntime (CPU) has no double kernel for one of the operators."""
    import onnxruntime as ort

    out = _prepare(model)
    narrow = [onnx.ValueInfoProto() for vi in out.graph.input if vi.name in weights]
    for vi, copy in zip([vi for vi in out.graph.input if vi.name in weights], narrow):
        copy.CopyFrom(vi)
        copy.name = NARROW + vi.name
    _graph_to_double(out.graph)
    if narrow:
        inputs = [vi for vi in out.graph.input if vi.name not in weights]
        del out.graph.input[:]
        out.graph.input.extend(inputs + narrow)
        first = {}  # each weight cast where it is first used, so no two float64 copies need to live at once
        for index, node in enumerate(out.graph.node):
            for name in _node_inputs(node):
                first.setdefault(name, index)
        nodes = list(out.graph.node)
        for vi in sorted(narrow, key=lambda vi: -first.get(vi.name[len(NARROW):], 0)):
            at = first.get(vi.name[len(NARROW):], 0)
            nodes.insert(at, helper.make_node("Cast", [vi.name], [vi.name[len(NARROW):]], to=TensorProto.DOUBLE))
        del out.graph.node[:]
        out.graph.node.extend(nodes)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(out.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        match = re.search(r"implementation for (\w+)\(\d+\) node with name '([^']*)'", str(exc))
        if match:
            raise UnsupportedError(
                f"operator '{match.group(1)}' (node '{match.group(2)}') has no double-precision kernel in "
                "onnxruntime (CPU), so this model cannot be evaluated in float64"
            ) from exc
        raise UnsupportedError(f"the float64 version of the model does not load in onnxruntime: {exc}") from exc
    return out


# =====================================================================================
# float64 without onnxruntime's double kernels
# =====================================================================================
# operators onnxruntime (CPU) has no double kernel for (probed on onnxruntime 1.22-1.32; LSTM,
# GRU and RNN load but refuse double when run): a graph with one goes to ``Evaluator``
NO_DOUBLE_KERNEL = frozenset({
    "Conv", "ConvTranspose", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LRN", "Erf", "Gelu", "Elu", "Selu",
    "Celu", "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "InstanceNormalization",
    "MeanVarianceNormalization", "Resize", "Hardmax", "Atan", "Tan", "Asin", "Acos", "Sinh", "Cosh", "LSTM", "GRU",
    "RNN"})


def lacks_double(model: onnx.ModelProto) -> str | None:
    """The first operator of ``model`` with no double kernel in onnxruntime, or None."""
    from .model import _all_nodes

    nodes = itertools.chain(_all_nodes(model.graph), (n for f in model.functions for n in f.node))
    return next((n.op_type for n in nodes if n.domain in ("", "ai.onnx") and n.op_type in NO_DOUBLE_KERNEL), None)


class Evaluator:
    """``model`` evaluated in float64 without onnxruntime, for graphs it cannot run in
    double: onnx's reference evaluator with its float initializers (cast when used),
    constants and casts made double, and the operators it implements slowly, or not to the spec in float64,
    replaced (``_overrides``). Offers what the ONNX backend uses of an onnxruntime session
    (``run``, ``jacli_inputs``); intermediates are freed after their last use, and an
    operator that still computes in a narrower float raises UnsupportedError."""

    jacli_reference = True

    def __init__(self, model: onnx.ModelProto):
        from onnx.reference import ReferenceEvaluator

        try:
            ref = ReferenceEvaluator(model, new_ops=_overrides())
        except Exception as exc:  # an operator the reference evaluator lacks
            raise UnsupportedError(f"the model cannot be evaluated in float64: {str(exc).splitlines()[0][:200]}") from exc
        for node in ref.rt_nodes_:
            if node.op_type == "Cast" and getattr(node, "to", None) in FLOAT_TYPES:
                node.to = TensorProto.DOUBLE
        self._ref = ref
        init = set(ref.rt_inits_)
        self.jacli_inputs = frozenset(i.name for i in model.graph.input if i.name not in init)
        self._free = not any(n.need_context() for n in ref.rt_nodes_)  # subgraphs read the enclosing scope
        self._last = {name: i for i, n in enumerate(ref.rt_nodes_) for name in n.input}

    def run(self, names, feeds):
        ref, keep = self._ref, set(names) | set(self._ref.rt_inits_)
        results = {"": None, **ref.rt_inits_, **feeds}
        for i, node in enumerate(ref.rt_nodes_):
            # float weights: cast per use, never stored twice; a product's right factor a block at a time
            args = [results[n] if k == 1 and node.op_type in _BLOCKED else _double(results[n])
                    for k, n in enumerate(node.input)]
            values = node.run(*args, context=results) if node.need_context() else node.run(*args)
            for name, value in zip(node.output, values):
                if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.dtype != np.float64:
                    if node.op_type not in ("Constant", "ConstantOfShape"):
                        raise UnsupportedError(f"operator '{node.op_type}' computes in {value.dtype} in onnx's "
                                               "reference evaluator, so this model cannot be evaluated in float64")
                    value = value.astype(np.float64)
                results[name] = value
            if self._free:
                for name in node.input:
                    if self._last.get(name) == i and name not in keep:
                        results.pop(name, None)
        return [results[n] for n in names]


def _double(v):
    return v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.dtype != np.float64 else v


# --- the replaced operators ---------------------------------------------------------------
IM2COL_BYTES = 1 << 27  # the im2col buffer of a convolution is built for this many bytes of samples at a time
CAST_BYTES = 1 << 26  # a float32 matrix factor is cast to float64 this many bytes at a time
_BLOCKED = frozenset({"MatMul", "Gemm"})  # their input 1 reaches them uncast (``_matmul``)


def _matmul(a, b):
    """a @ b in float64, a float64, b (a weight) cast a block of columns at a time, so that
    no float64 copy of a large weight is made whole."""
    if b.ndim != 2 or b.dtype == np.float64 or b.size * 8 <= CAST_BYTES:
        return np.matmul(a, _double(b))
    step = max(1, CAST_BYTES // (8 * b.shape[0]))
    out = np.empty(a.shape[:-1] + (b.shape[1],))
    for j in range(0, b.shape[1], step):
        out[..., j:j + step] = np.matmul(a, b[:, j:j + step].astype(np.float64))
    return out


def _pads(auto_pad, pads, spatial, extent, strides, ceil_mode=0):
    """(begin, end) padding per spatial axis, and the extra end padding ceil_mode adds."""
    nd = len(spatial)
    auto = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-s // st) for s, st in zip(spatial, strides)]
        total = [max(0, (o - 1) * st + e - s) for o, st, e, s in zip(out, strides, extent, spatial)]
        small = [t // 2 for t in total]
        begin = small if auto == "SAME_UPPER" else [t - b for t, b in zip(total, small)]
        return [(b, t - b) for b, t in zip(begin, total)], [0] * nd
    if auto == "VALID":
        pads = [0] * (2 * nd)
    pads = list(pads) if pads is not None else [0] * (2 * nd)
    pairs = [(pads[i], pads[i + nd]) for i in range(nd)]
    extra = [0] * nd
    if ceil_mode:
        for i, (s, (b, e), ext, st) in enumerate(zip(spatial, pairs, extent, strides)):
            span = s + b + e - ext
            out = -(-span // st) + 1
            if (out - 1) * st >= s + b:  # the last window would start in the end padding
                out -= 1
            extra[i] = max(0, (out - 1) * st + ext - (s + b + e))
    return pairs, extra


def _windows(x, kernel, strides, dilations, pairs, extra, fill):
    """Padded sliding windows of x (N, C, *spatial): (N, C, *out, *kernel), a view."""
    nd = len(kernel)
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(b, e + x_) for (b, e), x_ in zip(pairs, extra)], constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(xp, extent, axis=tuple(range(2, 2 + nd)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(
        slice(None, None, d) for d in dilations)
    return win[index]


def _conv(x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None, strides=None):
    nd = x.ndim - 2
    kernel = list(w.shape[2:])
    strides, dilations, group = list(strides or [1] * nd), list(dilations or [1] * nd), int(group or 1)
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    pairs, extra = _pads(auto_pad, pads, x.shape[2:], extent, strides)
    n, c, o = x.shape[0], x.shape[1], w.shape[0]
    cg, og, k = c // group, o // group, int(np.prod(kernel))
    wg = w.reshape(group, og, cg * k).transpose(0, 2, 1)  # (G, C/G·K, O/G)
    parts = []
    per = max(1, IM2COL_BYTES // max(1, x[:1].size * k * 8))
    for s in range(0, n, per):
        win = _windows(x[s:s + per], kernel, strides, dilations, pairs, extra, 0.0)  # (n, C, *out, *K)
        out = win.shape[2:2 + nd]
        m = win.shape[0] * int(np.prod(out))
        cols = np.moveaxis(win.reshape(win.shape[0], group, cg, *out, k), (2, 2 + nd + 1), (-2, -1))
        cols = cols.reshape(win.shape[0], group, *out, cg * k)
        cols = np.moveaxis(cols, 1, 0).reshape(group, m, cg * k)
        y = np.matmul(cols, wg)  # (G, n·out, O/G)
        y = np.moveaxis(y.reshape(group, win.shape[0], *out, og), 0, 1)  # (n, G, *out, O/G)
        parts.append(np.moveaxis(y, -1, 2).reshape(win.shape[0], o, *out))
    y = np.concatenate(parts)
    return y + b.reshape((1, -1) + (1,) * nd) if b is not None else y


def _pool(x, kind, auto_pad=None, ceil_mode=0, dilations=None, kernel_shape=None, pads=None, strides=None,
          count_include_pad=0, storage_order=0):
    nd = x.ndim - 2
    kernel = list(kernel_shape)
    strides, dilations = list(strides or [1] * nd), list(dilations or [1] * nd)
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    pairs, extra = _pads(auto_pad, pads, x.shape[2:], extent, strides, ceil_mode)
    axes = tuple(range(-nd, 0))
    if kind == "max":
        return _windows(x, kernel, strides, dilations, pairs, extra, -np.inf).max(axis=axes)
    total = _windows(x, kernel, strides, dilations, pairs, extra, 0.0).sum(axis=axes)
    ones = np.ones((1, 1, *x.shape[2:]))
    if count_include_pad:  # explicit padding counts, the ceil_mode extension does not
        ones = np.pad(ones, [(0, 0), (0, 0)] + list(pairs), constant_values=1.0)
        pairs = [(0, 0)] * nd
    count = _windows(ones, kernel, strides, dilations, pairs, extra, 0.0).sum(axis=axes)
    return total / count


def _lrn(x, alpha=None, beta=None, bias=None, size=None):
    """LRN as the ONNX spec defines it: the sum of squares over channels
    [c − floor((size−1)/2), c + ceil((size−1)/2)] (onnx.reference sums over the wrong axis)."""
    alpha = 1e-4 if alpha is None else float(alpha)  # float32 attributes: alpha / size must not round to float32
    beta = 0.75 if beta is None else float(beta)
    bias = 1.0 if bias is None else float(bias)
    lo, hi = (size - 1) // 2, -(-(size - 1) // 2)
    sq = np.pad(np.square(x), [(0, 0), (lo, hi)] + [(0, 0)] * (x.ndim - 2))
    csum = np.concatenate([np.zeros_like(sq[:, :1]), np.cumsum(sq, axis=1)], axis=1)
    c = x.shape[1]
    window = csum[:, size:size + c] - csum[:, :c]
    return x / (bias + (alpha / size) * window) ** beta


def _overrides():
    from onnx.reference.op_run import OpRun
    from scipy.special import erf

    class Conv(OpRun):
        op_domain = ""

        def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
                 strides=None):
            return (_conv(x, w, b, auto_pad, dilations, group, kernel_shape, pads, strides),)

    class MaxPool(OpRun):
        op_domain = ""

        def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,
                 storage_order=None, strides=None):
            if len(self.output) > 1 and self.output[1]:
                raise UnsupportedError("MaxPool with an Indices output has no float64 evaluation")
            return (_pool(x, "max", auto_pad, ceil_mode, dilations, kernel_shape, pads, strides),)

    class AveragePool(OpRun):
        op_domain = ""

        def _run(self, x, auto_pad=None, ceil_mode=None, count_include_pad=None, dilations=None, kernel_shape=None,
                 pads=None, strides=None):
            return (_pool(x, "avg", auto_pad, ceil_mode, dilations, kernel_shape, pads, strides, count_include_pad),)

    class LRN(OpRun):
        op_domain = ""

        def _run(self, x, alpha=None, beta=None, bias=None, size=None):
            return (_lrn(x, alpha, beta, bias, size),)

    class MatMul(OpRun):
        op_domain = ""

        def _run(self, a, b):
            return (_matmul(a, b),)

    class Gemm(OpRun):
        op_domain = ""

        def _run(self, a, b, c=None, alpha=None, beta=None, transA=None, transB=None):
            y = _matmul(a.T if transA else a, b.T if transB else b)
            alpha = 1.0 if alpha is None else float(alpha)
            if alpha != 1.0:
                y *= alpha
            if c is not None:
                y = y + (1.0 if beta is None else float(beta)) * c
            return (y,)

    class Erf(OpRun):
        op_domain = ""

        def _run(self, x):
            return (erf(x),)

    class Gelu(OpRun):  # a function op whose body would use onnx.reference's Erf
        op_domain = ""

        def _run(self, x, approximate=None):
            approximate = approximate.decode() if isinstance(approximate, bytes) else (approximate or "none")
            if approximate == "tanh":
                return (0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),)
            return (0.5 * x * (1 + erf(x / np.sqrt(2))),)

    class BatchNormalization(OpRun):  # onnx.reference's opset-9 version uses batch statistics
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None, spatial=None):
            if training_mode or len([o for o in self.output if o]) > 1:
                raise UnsupportedError("BatchNormalization in training mode has no float64 evaluation")
            shape = (-1,) + (1,) * (x.ndim - 2)
            eps = 1e-5 if epsilon is None else epsilon
            return (scale.reshape(shape) * (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
                    + bias.reshape(shape),)

    return [Conv, MaxPool, AveragePool, LRN, MatMul, Gemm, Erf, Gelu, BatchNormalization]
