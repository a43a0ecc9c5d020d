"""What the derivative rules build with: the prepared model (:class:`Info`), one node
being differentiated (:class:`Node`) and the :class:`Builder` that emits new ONNX nodes,
folding shapes known statically and computing the rest at run time."""
from __future__ import annotations

import copy
import itertools
import os
from typing import Sequence, Union

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper, numpy_helper

from ...errors import UnsupportedError


FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16})

Dim = Union[int, str]  # a static size, or the name of a 1-D int64 tensor of length 1


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise UnsupportedError("the model imports no version of the default ONNX operator set")


def with_nodes(model: onnx.ModelProto, nodes, initializers=()) -> onnx.ModelProto:
    """A copy of ``model`` whose graph runs ``nodes`` instead of its own, with
    ``initializers`` added to its own."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(initializers)
    return out


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
        _keep_asymmetric_linear_resize(out.graph)
    return out


def _keep_asymmetric_linear_resize(graph: onnx.GraphProto) -> None:
    """Upsample and Resize-10 interpolate linearly in asymmetric coordinates; onnx's version
    converter makes them a Resize-11 with the default half_pixel ones (another function, in
    onnxruntime too). Nearest modes it converts faithfully."""
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if (node.op_type == "Resize" and "coordinate_transformation_mode" not in attrs and "mode" in attrs
                and attrs["mode"].s == b"linear"):
            node.attribute.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))


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


class Info:
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
        known = set(self.dims)
        if any(o and o not in self.dims for node in graph.node for o in node.output):
            self._record(_symbolic_value_infos(model), missing_only=True)
        # shapes only onnxruntime's symbolic inference gave (it guesses some, e.g. equal
        # Split pieces when the sizes are computed): good for ranks, not for folding sizes
        self.guessed = set(self.dims) - known
        self.consts: dict[str, np.ndarray] = {}
        self.fed: frozenset[str] = frozenset()  # graph inputs that the model feeds its own weights (derive._start)
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
        self.producers = {o: node for node in graph.node for o in node.output if o}

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
        SymbolicShapeInference = _symbolic_shape_module().SymbolicShapeInference

        # the loop of SymbolicShapeInference.infer_shapes, which on an incomplete result
        # raises (dropping what it found) after saving a file in the working directory
        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
        inference._preprocess(model)
        while inference.run_:
            inference._infer_impl()
        return list(inference.out_mp_.graph.value_info)
    except Exception:  # optional refinement: rules needing a rank then say so themselves
        return []


def _symbolic_shape_module():
    """onnxruntime/tools/symbolic_shape_infer.py loaded on its own: importing it as
    ``onnxruntime.tools.symbolic_shape_infer`` runs that package's __init__, which imports
    torch when it is installed (seconds)."""
    import importlib.util
    import sys

    name = "_jacli_ort_symbolic_shape_infer"
    if name not in sys.modules:
        import onnxruntime

        path = os.path.join(os.path.dirname(onnxruntime.__file__), "tools", "symbolic_shape_infer.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def _constant_value(node: NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_floats"):
            return np.array(helper.get_attribute_value(attr), np.float32)
        if attr.name in ("value_int", "value_ints"):
            return np.array(helper.get_attribute_value(attr), np.int64)
    return None


class Node:
    """A node being differentiated: attributes decoded, active inputs known."""

    def __init__(self, proto: NodeProto, index: int, info: Info, active: frozenset[int]):
        self.proto = proto
        self.op_type = proto.op_type
        self.name = proto.name or f"{proto.op_type}#{index}"
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.active = active
        self.implicit: frozenset[str] = frozenset()  # active outer-scope tensors its subgraphs use
        self.parts: list = []  # (registry entry, the active inputs it differentiates)
        self.tangents: dict = {}
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

    def restricted(self, active: frozenset[int], tangents: dict | None = None) -> "Node":
        """This node as one registry entry sees it: only ``active`` inputs, and (JVP) the
        tangents known so far, which control-flow rules read for outer-scope tensors."""
        view = copy.copy(self)
        view.active = active
        view.tangents = tangents or {}
        return view

    def unsupported(self, what: str = "", hint: str | None = None) -> UnsupportedError:
        detail = f" {what}" if what else " has no derivative rule in jacli"
        hint = f"{hint} (or use --method fd)" if hint else "use --method fd for finite differences"
        return UnsupportedError(f"operator '{self.op_type}' (node '{self.name}'){detail}; {hint}")


class Builder:
    """Emits derivative nodes with unique names; folds statically known shapes."""

    def __init__(self, info: Info, taken: set[str]):
        self.info = info
        self.opset = info.opset
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: dict[str, onnx.ValueInfoProto] = {}  # inputs of the derivative graph's own (fed_input)
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

    def same(self, n: Node, *inputs: str | None, n_out: int = 1):
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
            self.info.consts[name] = numpy_helper.to_array(tensor)
        return self._consts[key]

    def fed_input(self, name: str, dtype: int, dims: list[int]) -> str:
        """A graph input of the derivative graph, fed by the model (as its weights are)."""
        if name not in self.inputs:
            self.inputs[name] = helper.make_tensor_value_info(name, dtype, dims)
            self._taken.add(name)
            self.info.types[name], self.info.dims[name] = dtype, list(dims)
        return name

    def scalar(self, value: float, dtype: int) -> str:
        return self.const(np.array(value, np.float64), dtype)

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.array(list(values), np.int64), TensorProto.INT64)

    def zeros_like(self, x: str, dtype: int) -> str:
        return self.op("ConstantOfShape", self.shape(x), value=helper.make_tensor("value", dtype, [1], [0.0]))

    # --- shapes -------------------------------------------------------------------
    def dims(self, x: str) -> list | None:
        return self.info.dims.get(x)

    def rank(self, x: str, n: Node) -> int:
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
    def unbroadcast(self, g: str, g_dims: list | None, x: str, n: Node) -> str:
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
