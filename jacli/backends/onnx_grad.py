"""Exact derivatives of ONNX models by graph transformation.

ONNX runtimes evaluate graphs but cannot differentiate them. This module rewrites an
``onnx.ModelProto`` into derivative graphs that are themselves plain ONNX models, run by
onnxruntime (CPU) like any other:

* :func:`build_vjp` (reverse mode): inputs are the original inputs plus a cotangent
  ``ct:<y>`` per output ``y`` in ``of``; outputs are ``grad:<x>`` for each ``x`` in ``wrt``.
* :func:`build_jvp` (forward mode): inputs are the original inputs plus a tangent
  ``tan:<x>`` per ``x`` in ``wrt``; outputs are ``jvp:<y>`` for each ``y`` in ``of``.
* :func:`to_float64`: the same function in double precision, for finite differences.

How the graphs are built. An activity analysis marks the tensors that depend on ``wrt``
*and* influence ``of``; only nodes touching them are differentiated, everything else
(shape plumbing, constant branches) is kept as forward computation. The original nodes
are kept (they provide the primal values the rules need; a MaxPool may be asked for its
Indices output as well), then the derivative nodes are appended: in reverse topological
order with cotangents summed per tensor (VJP), or in topological order (JVP); finally
everything the requested outputs do not need is pruned. Each operator has one VJP rule in
``VJP_RULES`` and one JVP rule in ``JVP_RULES``; a rule emits ordinary ONNX nodes through
:class:`_Builder`, which folds shapes that shape inference knows statically and computes
the rest at run time with ``Shape``/``Slice``/``Concat``, so a dynamic batch axis (or
dynamic spatial axes) stays dynamic. Emitted nodes use the form of each operator that
the model's opset defines (e.g. ``ReduceSum`` axes as an attribute before opset 13).

Operators with integer/bool outputs (``Shape``, ``ArgMax``, comparisons, ...) are listed
explicitly in ``NON_DIFFERENTIABLE``; piecewise-constant float operators (``Floor``,
``Sign``, ...) in ``PIECEWISE_CONSTANT`` (zero derivative almost everywhere, as in
PyTorch). Operators with rules differentiate their float outputs only (a ``Cast`` to an
integer type, MaxPool's ``Indices``, Dropout's ``mask`` carry no derivative). Any other
operator on the active path, and any input/output a rule does not cover (listed in
``_DIFF_INPUTS``/``_DIFF_OUTPUTS``, e.g. Conv weights), raises
:class:`~jacli.errors.UnsupportedError`; nothing is silently zero.

Conventions at points where the derivative is not defined (chosen to match PyTorch):
``Relu``/``LeakyRelu``/``PRelu``/``Elu``/``Selu`` use the negative branch at 0, ``Abs`` has
derivative 0 at 0, ``Clip`` passes the derivative at its bounds (inclusive), ``ReduceL2``
has derivative 0 at zero norm. ``MaxPool`` sends the derivative to the *first* maximum of
each window in row-major kernel order (the element onnxruntime's forward pass and
``torch.nn.functional.max_pool*d`` select); ``Max``/``Min``/``ReduceMax``/``ReduceMin``/
``GlobalMaxPool`` split it evenly among tied elements (as ``torch.maximum``/``torch.amax``).
VJP and JVP use the same choice, so rows and columns of a Jacobian agree everywhere.
"""
from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from typing import Callable, Sequence, Union

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper, numpy_helper

from ..errors import InputError, UnsupportedError

__all__ = ["build_vjp", "build_jvp", "to_float64", "VJP_RULES", "JVP_RULES"]

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16})

# Operators whose outputs are integer/bool (or only depend on shapes): zero derivative.
NON_DIFFERENTIABLE = frozenset({
    "Shape", "Size", "ArgMax", "ArgMin", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "NonZero",
    "ConstantOfShape", "EyeLike", "RandomNormalLike", "RandomUniformLike", "BitShift",
})
# Float-valued but piecewise constant: derivative zero almost everywhere (as in PyTorch).
PIECEWISE_CONSTANT = frozenset({"Sign", "Floor", "Ceil", "Round", "Hardmax"})

# Operators whose derivative is implemented only for some inputs / outputs (the others are
# float tensors too, e.g. Conv weights, BatchNormalization statistics, Clip bounds).
_DIFF_INPUTS = {
    "Conv": (0, 2), "ConvTranspose": (0, 2), "BatchNormalization": (0,),
    "InstanceNormalization": (0,), "Clip": (0,), "Pad": (0,), "Dropout": (0,), "LRN": (0,),
}
_DIFF_OUTPUTS = {"LayerNormalization": (0,)}

Dim = Union[int, str]  # a static size, or the name of a 1-D int64 tensor of length 1


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise UnsupportedError("the model imports no version of the default ONNX operator set")


def _prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """A private copy with local functions inlined and opset >= 11."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if out.functions:
        from onnx import inliner  # a submodule ``import onnx`` leaves out

        out = inliner.inline_local_functions(out)
    if _opset(out) < 11:
        try:
            out = onnx.version_converter.convert_version(out, 11)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            raise UnsupportedError(
                f"opset {_opset(out)} models must be convertible to opset 11 for derivatives ({exc}); "
                "use --method fd for finite differences"
            ) from exc
    return out


def _subgraph_inputs(node: NodeProto) -> set[str]:
    """Outer-scope names used inside the node's subgraphs (If/Loop/Scan bodies)."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for inner in g.node:
                local |= set(inner.output)
            for inner in g.node:
                names |= {i for i in list(inner.input) + sorted(_subgraph_inputs(inner)) if i and i not in local}
            names |= {o.name for o in g.output if o.name not in local}
    return names


def _node_inputs(node: NodeProto) -> list[str]:
    return [i for i in node.input if i] + sorted(_subgraph_inputs(node))


class _Info:
    """Static facts about the prepared model: element types, dims, constant values."""

    def __init__(self, model: onnx.ModelProto):
        self.opset = _opset(model)
        graph = model.graph
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
        except Exception:  # shape inference is an optimisation; rules fall back to Shape ops
            inferred = graph
        self.types: dict[str, int] = {}
        self.dims: dict[str, list | None] = {}
        self._record(itertools.chain(inferred.value_info, inferred.output, graph.output, graph.input))
        if any(o and o not in self.dims for node in graph.node for o in node.output):
            self._record(_symbolic_value_infos(model), missing_only=True)
        self.consts: dict[str, np.ndarray] = {}
        for init in graph.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
            self.types[init.name] = init.data_type
            self.dims[init.name] = list(init.dims)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_value(node)
                if value is not None:
                    self.consts[node.output[0]] = value
        self.inputs = {vi.name: vi for vi in graph.input}
        self.outputs = {vi.name: vi for vi in graph.output}

    def _record(self, value_infos, missing_only: bool = False) -> None:
        for vi in value_infos:
            t = vi.type.tensor_type
            if not vi.type.HasField("tensor_type") or (missing_only and vi.name in self.dims):
                continue
            if t.elem_type and not (missing_only and vi.name in self.types):
                self.types[vi.name] = t.elem_type
            if t.HasField("shape"):
                self.dims[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                      for d in t.shape.dim]

    def is_float(self, name: str) -> bool:
        return self.types.get(name, TensorProto.FLOAT) in FLOAT_TYPES


def _symbolic_value_infos(model: onnx.ModelProto) -> list:
    """onnxruntime's symbolic shape inference, which resolves ranks that onnx's leaves open
    (e.g. Reshape to a shape computed from Shape ops); [] where it is unavailable or fails."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        # the loop of SymbolicShapeInference.infer_shapes, which on an incomplete result
        # raises (dropping what it found) after saving a file in the working directory
        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
        inference._preprocess(model)
        while inference.run_:
            inference._infer_impl()
        return list(inference.out_mp_.graph.value_info)
    except Exception:  # optional refinement: rules needing a rank then say so themselves
        return []


def _constant_value(node: NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_floats"):
            return np.array(helper.get_attribute_value(attr), np.float32)
        if attr.name in ("value_int", "value_ints"):
            return np.array(helper.get_attribute_value(attr), np.int64)
    return None


class _Node:
    """A node being differentiated: attributes decoded, active inputs known."""

    def __init__(self, proto: NodeProto, index: int, info: _Info, active: frozenset[int]):
        self.proto = proto
        self.op_type = proto.op_type
        self.name = proto.name or f"{proto.op_type}#{index}"
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.active = active
        self.info = info
        self.attrs = {}
        for a in proto.attribute:
            value = helper.get_attribute_value(a)
            self.attrs[a.name] = value.decode() if isinstance(value, bytes) else value

    def attr(self, name: str, default=None):
        return self.attrs.get(name, default)

    def input(self, i: int) -> str | None:
        return self.inputs[i] if i < len(self.inputs) and self.inputs[i] else None

    def const(self, i: int) -> np.ndarray | None:
        name = self.input(i)
        return None if name is None else self.info.consts.get(name)

    @property
    def x(self) -> str:
        return self.inputs[0]

    @property
    def y(self) -> str:
        return self.outputs[0]

    @property
    def dtype(self) -> int:
        """The float element type the derivative lives in."""
        for name in self.outputs[:1] + self.inputs:
            if name and self.info.types.get(name) in FLOAT_TYPES:
                return self.info.types[name]
        return TensorProto.FLOAT

    def unsupported(self, what: str = "") -> UnsupportedError:
        detail = f" {what}" if what else " has no derivative rule in jacli"
        return UnsupportedError(
            f"operator '{self.op_type}' (node '{self.name}'){detail}; use --method fd for finite differences"
        )


class _Builder:
    """Emits derivative nodes with unique names; folds statically known shapes."""

    def __init__(self, info: _Info, taken: set[str]):
        self.info = info
        self.opset = info.opset
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.scope = "jacli"
        self._taken = taken
        self._count = itertools.count()
        self._consts: dict[tuple, str] = {}
        self._cache: dict[tuple, str] = {}

    # --- naming and node emission -------------------------------------------------
    def fresh(self, hint: str) -> str:
        while True:
            name = f"{self.scope}/{hint}_{next(self._count)}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def op(self, op_type: str, *inputs: str | None, n_out: int = 1, **attrs):
        """Emit one node; returns its output name (or list of names when n_out > 1)."""
        name = self.fresh(op_type)
        outs = [name] if n_out == 1 else [self.fresh(f"{op_type}_out") for _ in range(n_out)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, [i or "" for i in inputs], outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def same(self, n: _Node, *inputs: str | None, n_out: int = 1):
        """A copy of the original node (same op and attributes) on other inputs."""
        node = NodeProto()
        node.CopyFrom(n.proto)
        node.name = self.fresh(n.op_type)
        del node.input[:], node.output[:]
        node.input.extend(i or "" for i in inputs)
        outs = [node.name] if n_out == 1 else [self.fresh(f"{n.op_type}_out") for _ in range(n_out)]
        node.output.extend(outs)
        self.nodes.append(node)
        return outs[0] if n_out == 1 else outs

    # --- constants ----------------------------------------------------------------
    def const(self, value: np.ndarray, dtype: int | None = None) -> str:
        """An initializer holding ``value`` (converted to ONNX type ``dtype`` if given)."""
        value = np.asarray(value)
        dtype = dtype or helper.np_dtype_to_tensor_dtype(value.dtype)
        key = (dtype, value.shape, value.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            if dtype in (TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL):
                tensor = numpy_helper.from_array(value.astype(helper.tensor_dtype_to_np_dtype(dtype)), name)
            else:
                tensor = helper.make_tensor(name, dtype, value.shape, value.astype(np.float64).ravel().tolist())
            self.initializers.append(tensor)
            self._consts[key] = name
        return self._consts[key]

    def scalar(self, value: float, dtype: int) -> str:
        return self.const(np.array(value, np.float64), dtype)

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.array(list(values), np.int64), TensorProto.INT64)

    def zeros_like(self, x: str, dtype: int) -> str:
        return self.op("ConstantOfShape", self.shape(x), value=helper.make_tensor("value", dtype, [1], [0.0]))

    # --- shapes -------------------------------------------------------------------
    def dims(self, x: str) -> list | None:
        return self.info.dims.get(x)

    def rank(self, x: str, n: _Node) -> int:
        dims = self.dims(x)
        if dims is None:
            raise n.unsupported(f"needs the rank of tensor '{x}', which shape inference could not determine")
        return len(dims)

    def shape(self, x: str) -> str:
        """``Shape(x)`` as a constant when static, else computed once at run time."""
        dims = self.dims(x)
        if dims is not None and all(isinstance(d, int) for d in dims):
            return self.ints(dims)
        key = ("Shape", x)
        if key not in self._cache:
            self._cache[key] = self.op("Shape", x)
        return self._cache[key]

    def dim(self, x: str, axis: int) -> Dim:
        """Size of ``x`` along ``axis`` (non-negative): an int when static."""
        dims = self.dims(x)
        if dims is not None and isinstance(dims[axis], int):
            return dims[axis]
        key = ("dim", x, axis)
        if key not in self._cache:
            self._cache[key] = self.op("Slice", self.shape(x), self.ints([axis]), self.ints([axis + 1]))
        return self._cache[key]

    def _itensor(self, a: Dim) -> str:
        return self.ints([a]) if isinstance(a, int) else a

    def iadd(self, a: Dim, c: Dim) -> Dim:
        if isinstance(a, int) and isinstance(c, int):
            return a + c
        return self.op("Add", self._itensor(a), self._itensor(c))

    def isub(self, a: Dim, c: Dim) -> Dim:
        if isinstance(a, int) and isinstance(c, int):
            return a - c
        return self.op("Sub", self._itensor(a), self._itensor(c))

    def imul(self, a: Dim, c: int) -> Dim:
        return a * c if isinstance(a, int) else (a if c == 1 else self.op("Mul", a, self.ints([c])))

    def idiv(self, a: Dim, c: int) -> Dim:
        """Floor division of a non-negative size."""
        return a // c if isinstance(a, int) else (a if c == 1 else self.op("Div", a, self.ints([c])))

    def imax(self, a: Dim, c: Dim) -> Dim:
        if isinstance(a, int) and isinstance(c, int):
            return max(a, c)
        a, c = self._itensor(a), self._itensor(c)
        return self.op("Where", self.op("Greater", a, c), a, c)

    def ivec(self, items: Sequence[Dim]) -> str:
        """A 1-D int64 tensor from static and dynamic sizes."""
        if all(isinstance(i, int) for i in items):
            return self.ints(items)
        parts, run = [], []
        for item in items:
            if isinstance(item, int):
                run.append(item)
            else:
                if run:
                    parts.append(self.ints(run))
                    run = []
                parts.append(item)
        if run:
            parts.append(self.ints(run))
        return self.op("Concat", *parts, axis=0)

    # --- opset-dependent operator forms ---------------------------------------------
    def reduce(self, op: str, x: str, axes: Sequence[int] | str | None, keepdims: int = 1) -> str:
        """``op`` over ``axes`` (a list, a tensor name, or None for all axes)."""
        if axes is None:
            return self.op(op, x, keepdims=keepdims)
        if self.opset >= (13 if op == "ReduceSum" else 18):
            return self.op(op, x, axes if isinstance(axes, str) else self.ints(axes), keepdims=keepdims)
        if isinstance(axes, str):
            raise UnsupportedError(f"run-time reduction axes need opset >= 13 (model has {self.opset}); "
                                   "use --method fd for finite differences")
        return self.op(op, x, axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        if not axes:
            return x
        if self.opset >= 13:
            return self.op("Unsqueeze", x, self.ints(axes))
        return self.op("Unsqueeze", x, axes=list(axes))

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        if not axes:
            return x
        if self.opset >= 13:
            return self.op("Squeeze", x, self.ints(axes))
        return self.op("Squeeze", x, axes=list(axes))

    def reshape_like(self, v: str, x: str) -> str:
        return self.op("Reshape", v, self.shape(x))

    def add(self, *terms: str | None) -> str | None:
        terms = [t for t in terms if t is not None]
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else self.op("Add" if len(terms) == 2 else "Sum", *terms)

    # --- broadcasting ---------------------------------------------------------------
    def unbroadcast(self, g: str, g_dims: list | None, x: str, n: _Node) -> str:
        """Sum ``g`` (of the broadcast shape ``g_dims``) down to the shape of ``x``."""
        x_dims = self.dims(x)
        if g_dims is None or x_dims is None:
            raise n.unsupported(f"needs the rank of '{x}' and of its broadcast result")
        lead = len(g_dims) - len(x_dims)
        axes, ambiguous = list(range(lead)), False
        for i, (dx, dg) in enumerate(zip(x_dims, g_dims[lead:])):
            if dx == 1:
                if dg != 1:
                    axes.append(lead + i)
            elif dx is None or (isinstance(dx, str) and dx != dg):
                ambiguous = True  # could be 1 at run time: decide then
        if ambiguous:
            if self.opset < 13:
                raise n.unsupported(f"needs run-time broadcasting axes of '{x}' (opset >= 13)")
            target = self.shape(x)
            if lead:
                target_full = self.op("Concat", self.ints([1] * lead), target, axis=0)
            else:
                target_full = target
            differs = self.op("Not", self.op("Equal", target_full, self.op("Shape", g)))
            axes_t = self.op("Reshape", self.op("NonZero", differs), self.ints([-1]))
            summed = self.op("ReduceSum", g, axes_t, keepdims=1, noop_with_empty_axes=1)
            return self.op("Reshape", summed, target)
        if axes:
            g = self.reduce("ReduceSum", g, axes, keepdims=1)
            g = self.squeeze(g, list(range(lead)))
        return g

    def expand_to(self, t: str, t_dims: list | None, y: str) -> str:
        """``t`` broadcast to the shape of ``y`` (no-op when shapes statically agree)."""
        y_dims = self.dims(y)
        if t_dims is not None and y_dims is not None and len(t_dims) == len(y_dims) and all(
            a is not None and a == b for a, b in zip(t_dims, y_dims)
        ):
            return t
        return self.op("Expand", t, self.shape(y))


# =====================================================================================
# Rules. A VJP rule maps (builder, node, cotangent per output or None) to {input index:
# cotangent} for every active input; a JVP rule maps (builder, node, tangent per input or
# None) to a tangent per output (None for non-float outputs).
# =====================================================================================
VJP_RULES: dict[str, Callable] = {}
JVP_RULES: dict[str, Callable] = {}


def _vjp(*ops: str):
    def register(fn):
        for op in ops:
            VJP_RULES[op] = fn
        return fn

    return register


def _jvp(*ops: str):
    def register(fn):
        for op in ops:
            JVP_RULES[op] = fn
        return fn

    return register


# --- elementwise unary: one function v -> v * f'(x) serves both modes ------------------
def _unary(op: str):
    def register(apply: Callable[[_Builder, _Node, str], str]):
        VJP_RULES[op] = lambda b, n, gs: {0: apply(b, n, gs[0])}
        JVP_RULES[op] = lambda b, n, ts: [apply(b, n, ts[0])]
        return apply

    return register


def _c(b: _Builder, n: _Node, value: float) -> str:
    return b.scalar(value, n.dtype)


def _mask(b: _Builder, n: _Node, condition: str) -> str:
    """A bool condition as 1.0/0.0 in the derivative's dtype. Rules select with masks
    (v * m, or a m + c (1 - m), both exact for finite values) rather than Where, which
    onnxruntime runs several times slower than arithmetic."""
    return b.op("Cast", condition, to=n.dtype)


def _positive(b: _Builder, n: _Node) -> str:
    """1 where x > 0, else 0."""
    return _mask(b, n, b.op("Greater", n.x, _c(b, n, 0.0)))


def _blend(b: _Builder, n: _Node, m: str, a: str, c: str) -> str:
    """a where the mask m is 1, c where it is 0."""
    return b.op("Add", b.op("Mul", a, m), b.op("Mul", c, b.op("Sub", _c(b, n, 1.0), m)))


@_unary("Identity")
def _d_identity(b, n, v):
    return v


@_unary("Neg")
def _d_neg(b, n, v):
    return b.op("Neg", v)


@_unary("Abs")
def _d_abs(b, n, v):
    return b.op("Mul", v, b.op("Sign", n.x))


@_unary("Sqrt")
def _d_sqrt(b, n, v):
    return b.op("Div", b.op("Mul", v, _c(b, n, 0.5)), n.y)


@_unary("Exp")
def _d_exp(b, n, v):
    return b.op("Mul", v, n.y)


@_unary("Log")
def _d_log(b, n, v):
    return b.op("Div", v, n.x)


@_unary("Reciprocal")
def _d_reciprocal(b, n, v):
    return b.op("Neg", b.op("Mul", v, b.op("Mul", n.y, n.y)))


@_unary("Relu")
def _d_relu(b, n, v):
    return b.op("Mul", v, _positive(b, n))


@_unary("LeakyRelu")
def _d_leaky_relu(b, n, v):
    return b.op("Mul", v, _blend(b, n, _positive(b, n), _c(b, n, 1.0), _c(b, n, n.attr("alpha", 0.01))))


@_unary("Elu")
def _d_elu(b, n, v):
    negative = b.op("Add", n.y, _c(b, n, n.attr("alpha", 1.0)))  # alpha*exp(x) for x <= 0
    return b.op("Mul", v, _blend(b, n, _positive(b, n), _c(b, n, 1.0), negative))


@_unary("Selu")
def _d_selu(b, n, v):
    alpha, gamma = n.attr("alpha", 1.67326319217681884765625), n.attr("gamma", 1.05070102214813232421875)
    negative = b.op("Add", n.y, _c(b, n, alpha * gamma))  # gamma*alpha*exp(x) for x <= 0
    return b.op("Mul", v, _blend(b, n, _positive(b, n), _c(b, n, gamma), negative))


@_unary("Sigmoid")
def _d_sigmoid(b, n, v):
    return b.op("Mul", v, b.op("Mul", n.y, b.op("Sub", _c(b, n, 1.0), n.y)))


@_unary("HardSigmoid")
def _d_hard_sigmoid(b, n, v):
    inside = _mask(b, n, b.op("And", b.op("Greater", n.y, _c(b, n, 0.0)), b.op("Less", n.y, _c(b, n, 1.0))))
    return b.op("Mul", v, b.op("Mul", inside, _c(b, n, n.attr("alpha", 0.2))))


@_unary("HardSwish")
def _d_hard_swish(b, n, v):
    # y = x * clip(u, 0, 1) with u = x/6 + 1/2; dy/dx = 0 (u < 0), 2u - 1/2 (u <= 1), 1 (u > 1)
    u = b.op("Add", b.op("Mul", n.x, _c(b, n, 1.0 / 6.0)), _c(b, n, 0.5))
    mid = b.op("Sub", b.op("Add", u, u), _c(b, n, 0.5))
    above = _mask(b, n, b.op("Greater", u, _c(b, n, 1.0)))
    inside = b.op("Mul", mid, _mask(b, n, b.op("Not", b.op("Less", u, _c(b, n, 0.0)))))
    slope = _blend(b, n, above, _c(b, n, 1.0), inside)
    return b.op("Mul", v, slope)


@_unary("Tanh")
def _d_tanh(b, n, v):
    return b.op("Mul", v, b.op("Sub", _c(b, n, 1.0), b.op("Mul", n.y, n.y)))


@_unary("Softplus")
def _d_softplus(b, n, v):
    return b.op("Mul", v, b.op("Sigmoid", n.x))


@_unary("Softsign")
def _d_softsign(b, n, v):
    d = b.op("Add", _c(b, n, 1.0), b.op("Abs", n.x))
    return b.op("Div", v, b.op("Mul", d, d))


@_unary("Erf")
def _d_erf(b, n, v):
    e = b.op("Exp", b.op("Neg", b.op("Mul", n.x, n.x)))
    return b.op("Mul", v, b.op("Mul", e, _c(b, n, 2.0 / math.sqrt(math.pi))))


@_unary("Sin")
def _d_sin(b, n, v):
    return b.op("Mul", v, b.op("Cos", n.x))


@_unary("Cos")
def _d_cos(b, n, v):
    return b.op("Neg", b.op("Mul", v, b.op("Sin", n.x)))


@_unary("Gelu")
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


@_vjp("Dropout")
def _vjp_dropout(b, n, gs):
    _check_inference_dropout(n)
    return {0: gs[0]}


@_jvp("Dropout")
def _jvp_dropout(b, n, ts):
    _check_inference_dropout(n)
    return [ts[0]] + [None] * (len(n.outputs) - 1)


def _check_inference_dropout(n: _Node) -> None:
    if n.input(2) is not None:
        mode = n.const(2)
        if mode is None or bool(mode):
            raise n.unsupported("runs in training mode (random mask)")


@_vjp("Cast", "CastLike")
def _vjp_cast(b, n, gs):
    return {0: b.op("Cast", gs[0], to=b.info.types.get(n.x, n.dtype))}


@_jvp("Cast", "CastLike")
def _jvp_cast(b, n, ts):
    return [b.op("Cast", ts[0], to=b.info.types.get(n.y, n.dtype))]


# --- elementwise binary / variadic with broadcasting -----------------------------------
@_vjp("Add", "Sub", "Sum")
def _vjp_add(b, n, gs):
    out = {}
    for i in n.active:
        gi = b.unbroadcast(gs[0], b.dims(n.y), n.inputs[i], n)
        out[i] = b.op("Neg", gi) if n.op_type == "Sub" and i == 1 else gi
    return out


@_jvp("Add", "Sub", "Sum")
def _jvp_add(b, n, ts):
    terms = [b.op("Neg", t) if n.op_type == "Sub" and i == 1 else t for i, t in enumerate(ts) if t is not None]
    if len(terms) == 1:
        (i,) = [i for i, t in enumerate(ts) if t is not None]
        return [b.expand_to(terms[0], b.dims(n.inputs[i]), n.y)]
    return [b.expand_to(b.add(*terms), b.dims(n.y), n.y)]


@_vjp("Mean")
def _vjp_mean(b, n, gs):
    g = b.op("Mul", gs[0], _c(b, n, 1.0 / len(n.inputs)))
    return {i: b.unbroadcast(g, b.dims(n.y), n.inputs[i], n) for i in n.active}


@_jvp("Mean")
def _jvp_mean(b, n, ts):
    (t,) = _jvp_add(b, n, ts)
    return [b.op("Mul", t, _c(b, n, 1.0 / len(n.inputs)))]


@_vjp("Mul")
def _vjp_mul(b, n, gs):
    a, c = n.inputs
    return {i: b.unbroadcast(b.op("Mul", gs[0], c if i == 0 else a), b.dims(n.y), n.inputs[i], n) for i in n.active}


@_jvp("Mul")
def _jvp_mul(b, n, ts):
    a, c = n.inputs
    # each term already has the broadcast shape: t_a * c ~ (a, c), a * t_c ~ (a, c)
    return [b.add(b.op("Mul", ts[0], c) if ts[0] else None, b.op("Mul", a, ts[1]) if ts[1] else None)]


@_vjp("Div")
def _vjp_div(b, n, gs):
    a, c = n.inputs
    out = {}
    if 0 in n.active:
        out[0] = b.unbroadcast(b.op("Div", gs[0], c), b.dims(n.y), a, n)
    if 1 in n.active:
        out[1] = b.unbroadcast(b.op("Neg", b.op("Div", b.op("Mul", gs[0], n.y), c)), b.dims(n.y), c, n)
    return out


@_jvp("Div")
def _jvp_div(b, n, ts):
    a, c = n.inputs
    terms = [ts[0], b.op("Neg", b.op("Mul", n.y, ts[1])) if ts[1] else None]
    return [b.op("Div", b.add(*terms), c)]


def _pow_partials(b: _Builder, n: _Node) -> dict[int, str]:
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


@_vjp("Pow")
def _vjp_pow(b, n, gs):
    return {i: b.unbroadcast(b.op("Mul", gs[0], d), b.dims(n.y), n.inputs[i], n)
            for i, d in _pow_partials(b, n).items()}


@_jvp("Pow")
def _jvp_pow(b, n, ts):
    return [b.add(*[b.op("Mul", ts[i], d) for i, d in _pow_partials(b, n).items()])]


def _selection_weights(b: _Builder, n: _Node) -> list[str]:
    """Max/Min: weight of each operand in the result (ties split evenly)."""
    if len(n.inputs) == 1:
        return [_c(b, n, 1.0)]
    masks = [b.op("Cast", b.op("Equal", x, n.y), to=n.dtype) for x in n.inputs]
    count = b.op("Sum", *masks)
    return [b.op("Div", m, count) for m in masks]


@_vjp("Max", "Min")
def _vjp_max(b, n, gs):
    w = _selection_weights(b, n)
    return {i: b.unbroadcast(b.op("Mul", gs[0], w[i]), b.dims(n.y), n.inputs[i], n) for i in n.active}


@_jvp("Max", "Min")
def _jvp_max(b, n, ts):
    w = _selection_weights(b, n)
    terms = [b.op("Mul", t, w[i]) for i, t in enumerate(ts) if t is not None]
    return [b.add(*terms) if len(n.inputs) > 1 else terms[0]]  # weights are shaped like y


@_vjp("Where")
def _vjp_where(b, n, gs):
    m = _mask(b, n, n.inputs[0])
    out = {}
    if 1 in n.active:
        out[1] = b.unbroadcast(b.op("Mul", gs[0], m), b.dims(n.y), n.inputs[1], n)
    if 2 in n.active:
        out[2] = b.unbroadcast(b.op("Mul", gs[0], b.op("Sub", _c(b, n, 1.0), m)), b.dims(n.y), n.inputs[2], n)
    return out


@_jvp("Where")
def _jvp_where(b, n, ts):
    m = _mask(b, n, n.inputs[0])
    terms = [b.op("Mul", ts[1], m) if ts[1] else None,
             b.op("Mul", ts[2], b.op("Sub", _c(b, n, 1.0), m)) if ts[2] else None]
    dims = [b.dims(name) for name, t in zip(n.inputs, [1] + ts[1:]) if t is not None]
    return [b.expand_to(b.add(*terms), _broadcast_dims(dims), n.y)]


@_vjp("PRelu")
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


@_jvp("PRelu")
def _jvp_prelu(b, n, ts):
    x, slope = n.inputs
    pos = _positive(b, n)
    terms = [b.op("Mul", ts[0], _blend(b, n, pos, _c(b, n, 1.0), slope)) if ts[0] else None,
             b.op("Mul", b.op("Mul", x, ts[1]), b.op("Sub", _c(b, n, 1.0), pos)) if ts[1] else None]
    return [b.add(*terms)]


def _clip_mask(b: _Builder, n: _Node) -> str | None:
    """Where Clip passes the derivative: lo <= x <= hi (inclusive, as torch.clamp)."""
    lo = n.input(1) or (_c(b, n, n.attr("min")) if "min" in n.attrs else None)
    hi = n.input(2) or (_c(b, n, n.attr("max")) if "max" in n.attrs else None)
    parts = [b.op("Not", b.op("Less", n.x, lo)) if lo else None, b.op("Not", b.op("Greater", n.x, hi)) if hi else None]
    parts = [p for p in parts if p]
    if not parts:
        return None
    return _mask(b, n, parts[0] if len(parts) == 1 else b.op("And", *parts))


@_vjp("Clip")
def _vjp_clip(b, n, gs):
    mask = _clip_mask(b, n)
    return {0: gs[0] if mask is None else b.op("Mul", gs[0], mask)}


@_jvp("Clip")
def _jvp_clip(b, n, ts):
    mask = _clip_mask(b, n)
    return [ts[0] if mask is None else b.op("Mul", ts[0], mask)]


# --- linear algebra ---------------------------------------------------------------------
@_vjp("Gemm")
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


@_jvp("Gemm")
def _jvp_gemm(b, n, ts):
    a, c = n.inputs[:2]
    attrs = dict(alpha=n.attr("alpha", 1.0), transA=n.attr("transA", 0), transB=n.attr("transB", 0))
    terms = [b.op("Gemm", ts[0], c, **attrs) if ts[0] else None, b.op("Gemm", a, ts[1], **attrs) if ts[1] else None]
    if len(ts) > 2 and ts[2]:
        beta = n.attr("beta", 1.0)
        tc = ts[2] if beta == 1.0 else b.op("Mul", ts[2], _c(b, n, beta))
        terms.append(b.expand_to(tc, b.dims(n.inputs[2]), n.y))
    return [b.add(*terms)]


def _broadcast_dims(all_dims: list) -> list | None:
    """Static numpy-broadcast result of several dims lists (None if not all known)."""
    if any(d is None for d in all_dims):
        return None
    rank = max(len(d) for d in all_dims)
    out = []
    for i in range(rank):
        sizes = {d[len(d) - rank + i] for d in all_dims if len(d) - rank + i >= 0} - {1}
        if len(sizes) > 1 or None in sizes:
            return None
        out.append(sizes.pop() if sizes else 1)
    return out


def _swap_last2(b: _Builder, x: str, rank: int) -> str:
    return b.op("Transpose", x, perm=list(range(rank - 2)) + [rank - 1, rank - 2])


@_vjp("MatMul")
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


@_jvp("MatMul")
def _jvp_matmul(b, n, ts):
    a, c = n.inputs
    return [b.add(b.op("MatMul", ts[0], c) if ts[0] else None, b.op("MatMul", a, ts[1]) if ts[1] else None)]


# --- softmax family ---------------------------------------------------------------------
def _softmax_sum(b: _Builder, n: _Node, v: str) -> str:
    """Sum of ``v`` over the normalised axes, kept as size-1 axes (opset < 13: all axes
    from ``axis`` on, the input being seen as 2-D; opset >= 13: ``axis`` only)."""
    if b.opset >= 13:
        return b.reduce("ReduceSum", v, [n.attr("axis", -1)], keepdims=1)
    rank = b.rank(n.x, n)
    axis = n.attr("axis", 1) % rank
    return b.reduce("ReduceSum", v, list(range(axis, rank)), keepdims=1)


def _d_softmax(b: _Builder, n: _Node, v: str) -> str:
    p = b.op("Mul", v, n.y)  # y (v - sum(v y)); the Jacobian is symmetric
    return b.op("Sub", p, b.op("Mul", n.y, _softmax_sum(b, n, p)))


def _d_log_softmax(b: _Builder, n: _Node, v: str, transpose: bool) -> str:
    e = b.op("Exp", n.y)
    if transpose:  # g - softmax * sum(g)
        return b.op("Sub", v, b.op("Mul", e, _softmax_sum(b, n, v)))
    return b.op("Sub", v, _softmax_sum(b, n, b.op("Mul", e, v)))  # t - sum(softmax t)


VJP_RULES["Softmax"] = lambda b, n, gs: {0: _d_softmax(b, n, gs[0])}
JVP_RULES["Softmax"] = lambda b, n, ts: [_d_softmax(b, n, ts[0])]
VJP_RULES["LogSoftmax"] = lambda b, n, gs: {0: _d_log_softmax(b, n, gs[0], transpose=True)}
JVP_RULES["LogSoftmax"] = lambda b, n, ts: [_d_log_softmax(b, n, ts[0], transpose=False)]


# --- reductions -------------------------------------------------------------------------
def _reduce_axes(b: _Builder, n: _Node):
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


def _with_kept_dims(b: _Builder, n: _Node, v: str, axes, keepdims: int) -> str:
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


def _reduce_weights(b: _Builder, n: _Node, axes, keepdims: int) -> str | None:
    """dy/dx of the reduction per element of x (None: 1). With "noop" axes (empty, and
    noop_with_empty_axes) nothing is reduced but the elementwise part still applies
    (ReduceL1 gives |x|, ReduceSumSquare x^2, ...)."""
    op, x, noop = n.op_type, n.x, axes == "noop"
    if op == "ReduceSum" or (noop and op in ("ReduceMean", "ReduceMax", "ReduceMin")):
        return None
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


_REDUCTIONS = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1", "ReduceSumSquare",
               "ReduceLogSumExp")


@_vjp(*_REDUCTIONS)
def _vjp_reduce(b, n, gs):
    axes, keepdims = _reduce_axes(b, n)
    g = gs[0] if axes == "noop" else b.op("Expand", _with_kept_dims(b, n, gs[0], axes, keepdims), b.shape(n.x))
    w = _reduce_weights(b, n, axes, keepdims)
    return {0: g if w is None else b.op("Mul", g, w)}


@_jvp(*_REDUCTIONS)
def _jvp_reduce(b, n, ts):
    axes, keepdims = _reduce_axes(b, n)
    if axes != "noop" and n.op_type in ("ReduceSum", "ReduceMean"):  # linear: the op itself
        return [b.same(n, ts[0], *n.inputs[1:])]
    w = _reduce_weights(b, n, axes, keepdims)
    t = ts[0] if w is None else b.op("Mul", ts[0], w)
    return [t if axes == "noop" else b.reduce("ReduceSum", t, axes, keepdims)]


@_vjp("CumSum")
def _vjp_cumsum(b, n, gs):
    return {0: b.op("CumSum", gs[0], n.inputs[1], exclusive=n.attr("exclusive", 0), reverse=1 - n.attr("reverse", 0))}


@_jvp("CumSum")
def _jvp_cumsum(b, n, ts):
    return [b.same(n, ts[0], n.inputs[1])]


# --- data movement ----------------------------------------------------------------------
@_vjp("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def _vjp_reshape(b, n, gs):
    return {0: b.reshape_like(gs[0], n.x)}


@_jvp("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Expand", "Tile", "Slice", "Gather",
      "GatherElements", "GatherND")
def _jvp_same(b, n, ts):
    """Linear in the first input, other inputs being indices/shapes: the op itself."""
    return [b.same(n, ts[0], *n.inputs[1:])]


@_vjp("Transpose")
def _vjp_transpose(b, n, gs):
    perm = n.attr("perm")
    return {0: b.op("Transpose", gs[0], perm=None if perm is None else [int(i) for i in np.argsort(perm)])}


@_vjp("Expand")
def _vjp_expand(b, n, gs):
    return {0: b.unbroadcast(gs[0], b.dims(n.y), n.x, n)}


@_vjp("Tile")
def _vjp_tile(b, n, gs):
    rank = b.rank(n.x, n)
    # (r0*d0, r1*d1, ...) -> (r0, d0, r1, d1, ...), then sum over the r axes
    pairs = b.op("Concat", b.unsqueeze(n.inputs[1], [1]), b.unsqueeze(b.shape(n.x), [1]), axis=1)
    split = b.op("Reshape", gs[0], b.op("Reshape", pairs, b.ints([-1])))
    return {0: b.reduce("ReduceSum", split, list(range(0, 2 * rank, 2)), keepdims=0)}


@_vjp("Concat")
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


@_jvp("Concat")
def _jvp_concat(b, n, ts):
    parts = [t if t is not None else b.zeros_like(x, n.dtype) for x, t in zip(n.inputs, ts)]
    return [b.op("Concat", *parts, axis=n.attr("axis"))]


@_vjp("Split")
def _vjp_split(b, n, gs):
    parts = [g if g is not None else b.zeros_like(y, n.dtype) for y, g in zip(n.outputs, gs)]
    return {0: b.op("Concat", *parts, axis=n.attr("axis", 0))}


@_jvp("Split")
def _jvp_split(b, n, ts):
    outs = b.same(n, ts[0], *n.inputs[1:], n_out=len(n.outputs))
    return outs if len(n.outputs) > 1 else [outs]


def _scatter_back(b: _Builder, n: _Node, g: str, op_inputs: Sequence[str], unique: bool) -> str:
    """VJP of a pure selection op (each output element is some element of x): apply the
    same op to the positions 0..size-1 of x and scatter-add g back to those positions."""
    x = n.x
    size = b.op("Size", x)
    start, step = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    positions = b.op("Reshape", b.op("Range", start, size, step), b.shape(x))
    taken = b.op("Reshape", b.same(n, positions, *op_inputs), b.ints([-1]))
    if not unique and b.opset < 16:
        raise n.unsupported(f"may select an element twice, which needs ScatterElements(reduction='add') "
                            f"from opset 16 (model has opset {b.opset}) for its derivative")
    zeros = b.op("ConstantOfShape", b.op("Reshape", size, b.ints([1])),
                 value=helper.make_tensor("value", n.dtype, [1], [0.0]))
    flat = b.op("ScatterElements", zeros, taken, b.op("Reshape", g, b.ints([-1])), axis=0,
                reduction=None if unique else "add")
    return b.reshape_like(flat, x)


def _const_indices_unique(b: _Builder, n: _Node) -> bool:
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


@_vjp("Gather")
def _vjp_gather(b, n, gs):
    return {0: _scatter_back(b, n, gs[0], n.inputs[1:], unique=_const_indices_unique(b, n))}


@_vjp("GatherElements", "GatherND")
def _vjp_gather_elements(b, n, gs):
    return {0: _scatter_back(b, n, gs[0], n.inputs[1:], unique=False)}


@_vjp("Slice")
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


@_vjp("Pad")
def _vjp_pad(b, n, gs):
    mode = n.attr("mode", "constant")
    if mode == "constant":  # crop: pad by the negated amounts
        pads = n.const(1)
        neg = b.ints(-pads) if pads is not None else b.op("Neg", n.inputs[1])
        return {0: b.same(n, gs[0], neg, *_pad_rest(n))}
    return {0: _scatter_back(b, n, gs[0], [n.inputs[1], *_pad_rest(n)], unique=False)}


def _pad_rest(n: _Node) -> list[str]:
    """Pad's inputs after ``pads`` without the padding value (zero / unused): only axes."""
    return ["", n.inputs[3]] if n.input(3) else []


@_jvp("Pad")
def _jvp_pad(b, n, ts):
    return [b.same(n, ts[0], n.inputs[1], *_pad_rest(n))]


# --- convolution and pooling ------------------------------------------------------------
class _Window:
    """Geometry of a sliding-window op along its spatial axes (sizes are Dims)."""

    def __init__(self, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                 begin: Sequence[Dim], end: Sequence[Dim]):
        self.kernel, self.strides, self.dilations = list(kernel), list(strides), list(dilations)
        self.begin, self.end = list(begin), list(end)

    def extent(self, i: int) -> int:
        return (self.kernel[i] - 1) * self.dilations[i] + 1


def _kernel_shape(b: _Builder, n: _Node) -> list[int]:
    if n.attr("kernel_shape"):
        return list(n.attr("kernel_shape"))
    w_dims = b.dims(n.inputs[1])
    if w_dims is None or not all(isinstance(d, int) for d in w_dims[2:]):
        raise n.unsupported("needs a static kernel shape")
    return list(w_dims[2:])


def _window(b: _Builder, n: _Node, kernel: list[int]) -> _Window:
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


def _pad_spatial(b: _Builder, x: str, begin: Sequence[Dim], end: Sequence[Dim], value: str | None) -> str:
    if all(isinstance(p, int) and p == 0 for p in list(begin) + list(end)):
        return x
    pads = b.ivec([0, 0, *begin, 0, 0, *end])
    return b.op("Pad", x, pads, value) if value else b.op("Pad", x, pads)


def _spatial(b: _Builder, x: str, k: int) -> list[Dim]:
    return [b.dim(x, 2 + i) for i in range(k)]


def _window_adjoint(b: _Builder, g: str, w: str, sizes: list[Dim], outs: list[Dim], win: _Window,
                    group: int) -> str:
    """Adjoint (w.r.t. its input, of spatial ``sizes``) of ``Conv(., w)`` with window ``win``
    and output spatial sizes ``outs``, applied to g: a ConvTranspose, cropped or
    zero-extended to the input's size."""
    k = len(win.kernel)
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


def _bias_shape(b: _Builder, v: str, rank: int) -> str:
    """A per-channel vector (C,) as (C, 1, ..., 1) for broadcasting against (N, C, ...)."""
    return b.unsqueeze(v, list(range(1, rank - 1)))


@_vjp("Conv")
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


@_jvp("Conv", "ConvTranspose")
def _jvp_conv(b, n, ts):
    terms = [b.same(n, ts[0], n.inputs[1]) if ts[0] else None]
    if len(ts) > 2 and ts[2]:
        terms.append(b.expand_to(_bias_shape(b, ts[2], b.rank(n.y, n)), None, n.y))
    return [b.add(*terms)]


def _conv_transpose_pads(b: _Builder, n: _Node, kernel: list[int]) -> tuple[list, list]:
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


@_vjp("ConvTranspose")
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


def _planes(b: _Builder, v: str, like: str, k: int) -> str:
    """(N, C, *spatial) -> (N*C, 1, *spatial), spatial sizes taken from ``like``."""
    return b.op("Reshape", v, b.ivec([-1, 1] + _spatial(b, like, k)))


def _one_hot_kernel(b: _Builder, n: _Node, kernel: list[int]) -> str:
    """(K, 1, *kernel) with filter j picking the j-th window element (row-major)."""
    size = int(np.prod(kernel))
    return b.const(np.eye(size).reshape([size, 1] + kernel), n.dtype)


def _window_geometry(b: _Builder, n: _Node) -> tuple[_Window, list[int]]:
    kernel = list(n.attr("kernel_shape"))
    win = _window(b, n, kernel)
    # extend the end so that every output window (ceil_mode included) lies inside
    for i in range(len(kernel)):
        full = b.iadd(b.imul(b.isub(b.dim(n.y, 2 + i), 1), win.strides[i]), win.extent(i))
        win.end[i] = b.imax(win.end[i], b.isub(b.isub(full, b.dim(n.x, 2 + i)), win.begin[i]))
    return win, kernel


def _max_pool_indices(b: _Builder, n: _Node) -> str:
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


def _overlapping(n: _Node) -> bool:
    """Whether MaxPool's windows overlap (an element can be the maximum of two)."""
    kernel = n.attr("kernel_shape")
    strides, dilations = n.attr("strides") or [1] * len(kernel), n.attr("dilations") or [1] * len(kernel)
    return any(s < (k - 1) * d + 1 for k, s, d in zip(kernel, strides, dilations))


@_vjp("MaxPool")
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


@_jvp("MaxPool")
def _jvp_max_pool(b, n, ts):
    picked = b.op("Gather", b.op("Reshape", ts[0], b.ints([-1])), _max_pool_indices(b, n))
    return [picked] + [None] * (len(n.outputs) - 1)


def _max_pool_vjp_by_masks(b: _Builder, n: _Node, g: str) -> str:
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


@_vjp("AveragePool")
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


@_jvp("AveragePool", "GlobalAveragePool")
def _jvp_linear_pool(b, n, ts):
    return [b.same(n, ts[0])]


@_vjp("GlobalAveragePool")
def _vjp_global_average_pool(b, n, gs):
    per_element = b.op("Div", b.op("Cast", b.op("Size", n.y), to=n.dtype), b.op("Cast", b.op("Size", n.x), to=n.dtype))
    return {0: b.op("Expand", b.op("Mul", gs[0], per_element), b.shape(n.x))}


def _global_max_weights(b: _Builder, n: _Node) -> tuple[str, list[int]]:
    axes = list(range(2, b.rank(n.x, n)))
    mask = b.op("Cast", b.op("Equal", n.x, n.y), to=n.dtype)
    return b.op("Div", mask, b.reduce("ReduceSum", mask, axes, keepdims=1)), axes


@_vjp("GlobalMaxPool")
def _vjp_global_max_pool(b, n, gs):
    w, _ = _global_max_weights(b, n)
    return {0: b.op("Mul", gs[0], w)}


@_jvp("GlobalMaxPool")
def _jvp_global_max_pool(b, n, ts):
    w, axes = _global_max_weights(b, n)
    return [b.reduce("ReduceSum", b.op("Mul", ts[0], w), axes, keepdims=1)]


# --- normalisation ----------------------------------------------------------------------
def _lrn_terms(b: _Builder, n: _Node) -> tuple[str, str, float]:
    """LRN: y = x s^-beta, s = bias + alpha/size * (window sum over channels of x^2).
    Returns s^-beta, s^(-beta-1) and the constant 2 alpha beta / size."""
    size, alpha, beta = n.attr("size"), n.attr("alpha", 1e-4), n.attr("beta", 0.75)
    bias = n.attr("bias", 1.0)
    s = b.op("Add", _c(b, n, bias), b.op("Mul", _lrn_window(b, n, b.op("Mul", n.x, n.x), False),
                                         _c(b, n, alpha / size)))
    s_beta = b.op("Pow", s, _c(b, n, -beta))
    return s_beta, b.op("Div", s_beta, s), 2 * alpha * beta / size


def _lrn_window(b: _Builder, n: _Node, v: str, transpose: bool) -> str:
    """Sum of v over channels [c - (size-1)//2, c + size//2] (or the transposed window)."""
    size, rank = n.attr("size"), b.rank(n.x, n)
    lo, hi = (size - 1) // 2, size // 2
    if transpose:
        lo, hi = hi, lo
    kernel = b.const(np.ones([1, 1, size] + [1] * (rank - 2)), n.dtype)
    summed = b.op("Conv", b.unsqueeze(v, [1]), kernel, pads=[lo] + [0] * (rank - 2) + [hi] + [0] * (rank - 2))
    return b.squeeze(summed, [1])


@_vjp("LRN")
def _vjp_lrn(b, n, gs):
    s_beta, s_beta1, k = _lrn_terms(b, n)
    back = _lrn_window(b, n, b.op("Mul", b.op("Mul", gs[0], n.x), s_beta1), True)
    return {0: b.op("Sub", b.op("Mul", gs[0], s_beta), b.op("Mul", b.op("Mul", n.x, back), _c(b, n, k)))}


@_jvp("LRN")
def _jvp_lrn(b, n, ts):
    s_beta, s_beta1, k = _lrn_terms(b, n)
    fwd = _lrn_window(b, n, b.op("Mul", n.x, ts[0]), False)
    return [b.op("Sub", b.op("Mul", ts[0], s_beta),
                 b.op("Mul", b.op("Mul", b.op("Mul", n.x, s_beta1), fwd), _c(b, n, k)))]


def _batch_norm_scale(b: _Builder, n: _Node) -> str:
    if n.attr("training_mode", 0) or any(n.outputs[1:]):
        raise n.unsupported("runs in training mode (batch statistics)")
    scale, var = n.inputs[1], n.inputs[4]
    std = b.op("Sqrt", b.op("Add", var, _c(b, n, n.attr("epsilon", 1e-5))))
    return _bias_shape(b, b.op("Div", scale, std), b.rank(n.x, n))


VJP_RULES["BatchNormalization"] = lambda b, n, gs: {0: b.op("Mul", gs[0], _batch_norm_scale(b, n))}
JVP_RULES["BatchNormalization"] = lambda b, n, ts: [b.op("Mul", ts[0], _batch_norm_scale(b, n))]


def _standardized(b: _Builder, n: _Node, axes: list[int]) -> tuple[str, str]:
    """x_hat = (x - mean) r and r = 1/sqrt(var + eps) over ``axes`` (recomputed in x's precision)."""
    centered = b.op("Sub", n.x, b.reduce("ReduceMean", n.x, axes, keepdims=1))
    var = b.reduce("ReduceMean", b.op("Mul", centered, centered), axes, keepdims=1)
    r = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, _c(b, n, n.attr("epsilon", 1e-5)))))
    return b.op("Mul", centered, r), r


def _d_standardize(b: _Builder, n: _Node, v: str, axes: list[int], xhat: str, r: str) -> str:
    """(d x_hat/dx) applied to v; the map is symmetric so VJP and JVP share it:
    r (v - mean(v) - x_hat mean(x_hat v))."""
    mean_v = b.reduce("ReduceMean", v, axes, keepdims=1)
    mean_xv = b.reduce("ReduceMean", b.op("Mul", xhat, v), axes, keepdims=1)
    return b.op("Mul", r, b.op("Sub", b.op("Sub", v, mean_v), b.op("Mul", xhat, mean_xv)))


def _layer_norm_axes(b: _Builder, n: _Node) -> list[int]:
    rank = b.rank(n.x, n)
    return list(range(n.attr("axis", -1) % rank, rank))


@_vjp("LayerNormalization")
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


@_jvp("LayerNormalization")
def _jvp_layer_norm(b, n, ts):
    axes = _layer_norm_axes(b, n)
    xhat, r = _standardized(b, n, axes)
    terms = [b.op("Mul", _d_standardize(b, n, ts[0], axes, xhat, r), n.inputs[1]) if ts[0] else None,
             b.op("Mul", xhat, ts[1]) if ts[1] else None]
    if len(ts) > 2 and ts[2]:
        terms.append(b.expand_to(ts[2], b.dims(n.inputs[2]), n.y))
    return [b.add(*terms)] + [None] * (len(n.outputs) - 1)


def _instance_norm(b: _Builder, n: _Node, v: str) -> str:
    rank = b.rank(n.x, n)
    axes = list(range(2, rank))
    xhat, r = _standardized(b, n, axes)
    return _d_standardize(b, n, b.op("Mul", v, _bias_shape(b, n.inputs[1], rank)), axes, xhat, r)


VJP_RULES["InstanceNormalization"] = lambda b, n, gs: {0: _instance_norm(b, n, gs[0])}
JVP_RULES["InstanceNormalization"] = lambda b, n, ts: [_instance_norm(b, n, ts[0])]


# =====================================================================================
# Drivers
# =====================================================================================
def _active_nodes(model: onnx.ModelProto, info: _Info, wrt: Sequence[str], of: Sequence[str]) -> list[_Node]:
    """Nodes on a path from ``wrt`` to ``of`` (in topological order), each checked to have a
    rule for the inputs/outputs it is differentiated along."""
    nodes = list(model.graph.node)
    varied = set(wrt)
    for node in nodes:
        if not any(i in varied for i in _node_inputs(node)):
            continue
        if node.op_type in NON_DIFFERENTIABLE or node.op_type in PIECEWISE_CONSTANT:
            continue
        if node.op_type in VJP_RULES and node.domain in ("", "ai.onnx"):
            varied |= {o for o in node.output if o and info.is_float(o)}
        else:
            varied |= {o for o in node.output if o}  # unknown op: treat all outputs as dependent
    useful = set(of)
    for node in reversed(nodes):
        if any(o in useful for o in node.output):
            useful |= set(_node_inputs(node))
    active = varied & useful
    result = []
    for index, node in enumerate(nodes):
        if not any(o in active for o in node.output):
            continue
        act_in = frozenset(i for i, name in enumerate(node.input) if name in active)
        implicit = _subgraph_inputs(node) & active
        if not act_in and not implicit:
            continue
        n = _Node(node, index, info, act_in)
        if node.domain not in ("", "ai.onnx") or node.op_type not in VJP_RULES or implicit:
            raise n.unsupported()
        bad_in = sorted(act_in - set(_DIFF_INPUTS.get(n.op_type, act_in)))
        if bad_in:
            raise n.unsupported(f"has no derivative rule with respect to its input {bad_in[0]} "
                                f"('{node.input[bad_in[0]]}')")
        allowed_out = _DIFF_OUTPUTS.get(n.op_type, range(len(node.output)))
        bad_out = [i for i, o in enumerate(node.output) if o in active and i not in allowed_out]
        if bad_out:
            raise n.unsupported(f"has no derivative rule for its output {bad_out[0]} ('{node.output[bad_out[0]]}')")
        result.append(n)
    return result


def _check_request(info: _Info, wrt: Sequence[str], of: Sequence[str]) -> None:
    for name in wrt:
        if name not in info.inputs:
            raise InputError(f"'{name}' is not an input of the model (inputs: {', '.join(info.inputs)})")
        if not info.is_float(name):
            raise InputError(f"input '{name}' is not a floating-point tensor; it has no derivative")
    for name in of:
        if name not in info.outputs:
            raise InputError(f"'{name}' is not an output of the model (outputs: {', '.join(info.outputs)})")
        if not info.is_float(name):
            raise InputError(f"output '{name}' is not a floating-point tensor; it has no derivative")


def _like(info: _Info, source: str, name: str) -> onnx.ValueInfoProto:
    """Value info for ``name`` with the type and (inferred) shape of tensor ``source``."""
    return helper.make_tensor_value_info(name, info.types[source], info.dims.get(source))


def _assemble(model: onnx.ModelProto, b: _Builder, extra_inputs: list, results: dict[str, str],
              result_types: list) -> onnx.ModelProto:
    """Forward nodes + derivative nodes + Identity to the public output names, pruned to
    what the outputs need."""
    graph = model.graph
    for public, internal in results.items():
        b.nodes.append(helper.make_node("Identity", [internal], [public], name=b.fresh("output")))
    nodes = list(graph.node) + b.nodes
    needed = set(results)
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed |= set(_node_inputs(node))
    kept.reverse()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    new = out.graph
    del new.node[:], new.initializer[:], new.output[:], new.value_info[:]
    new.node.extend(kept)
    new.initializer.extend(t for t in list(graph.initializer) + b.initializers if t.name in needed)
    new.input.extend(extra_inputs)
    new.output.extend(result_types)
    produced = {o for node in kept for o in node.output}
    new.value_info.extend(vi for vi in graph.value_info if vi.name in produced)
    return out


def _start(model: onnx.ModelProto, wrt: Sequence[str], of: Sequence[str]):
    model = _prepare(model)
    info = _Info(model)
    _check_request(info, wrt, of)
    taken = {vi.name for vi in itertools.chain(model.graph.input, model.graph.output, model.graph.value_info)}
    taken |= {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        taken |= set(node.input) | set(node.output) | {node.name}
    for name in [f"ct:{y}" for y in of] + [f"grad:{x}" for x in wrt] + [f"tan:{x}" for x in wrt] + [
        f"jvp:{y}" for y in of
    ]:
        if name in taken:
            raise UnsupportedError(f"the model already uses the name '{name}' that jacli gives a derivative")
    return model, info, _Builder(info, taken), _active_nodes(model, info, wrt, of)


def build_vjp(model: onnx.ModelProto, wrt: list[str], of: list[str]) -> onnx.ModelProto:
    """Reverse-mode derivative graph: original inputs + ``ct:<y>`` per ``y`` in ``of``
    (shaped like y) -> ``grad:<x>`` per ``x`` in ``wrt`` (shaped like x)."""
    model, info, b, nodes = _start(model, wrt, of)
    cts: dict[str, list[str]] = defaultdict(list)
    for y in of:
        cts[y].append(f"ct:{y}")
    for n in reversed(nodes):
        b.scope = f"vjp/{n.name}"
        gs = [b.add(*cts.pop(o)) if o in cts else None for o in n.outputs]
        if all(g is None for g in gs):
            continue
        grads = VJP_RULES[n.op_type](b, n, gs)
        missing = n.active - set(grads)
        if missing:
            raise AssertionError(f"VJP rule of {n.op_type} gave no cotangent for inputs {sorted(missing)}")
        for i, g in grads.items():
            cts[n.inputs[i]].append(g)
    b.scope = "vjp"
    results = {}
    for x in wrt:
        results[f"grad:{x}"] = b.add(*cts[x]) if cts.get(x) else b.zeros_like(x, info.types[x])
    extra = [_like(info, y, f"ct:{y}") for y in of]
    types = [_like(info, x, f"grad:{x}") for x in wrt]
    return _assemble(model, b, extra, results, types)


def build_jvp(model: onnx.ModelProto, wrt: list[str], of: list[str]) -> onnx.ModelProto:
    """Forward-mode derivative graph: original inputs + ``tan:<x>`` per ``x`` in ``wrt``
    (shaped like x) -> ``jvp:<y>`` per ``y`` in ``of`` (shaped like y)."""
    model, info, b, nodes = _start(model, wrt, of)
    tangents = {x: f"tan:{x}" for x in wrt}
    for n in nodes:
        b.scope = f"jvp/{n.name}"
        ts = [tangents.get(name) if i in n.active else None for i, name in enumerate(n.inputs)]
        outs = JVP_RULES[n.op_type](b, n, ts)
        for o, t in zip(n.outputs, outs):
            if t is not None:
                tangents[o] = t
    b.scope = "jvp"
    results = {}
    for y in of:
        results[f"jvp:{y}"] = tangents.get(y) or b.zeros_like(y, info.types[y])
    extra = [_like(info, x, f"tan:{x}") for x in wrt]
    types = [_like(info, y, f"jvp:{y}") for y in of]
    return _assemble(model, b, extra, results, types)


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


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same function in double precision (float inputs, outputs, initializers,
    constants and casts made double). Raises UnsupportedError when onnxruntime (CPU) has
    no double kernel for one of the operators."""
    import onnxruntime as ort

    out = _prepare(model)
    _graph_to_double(out.graph)
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

