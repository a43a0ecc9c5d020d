"""The check every ONNX rule test of the resampling, selection, elementwise and normalisation
families runs, and the attribute sets of onnx's own node tests.

``check_rule`` compares the Jacobian assembled from a rule's VJP graph (rows) and JVP graph
(columns) with central finite differences in float64 of an independent evaluation of the
operator: onnx's reference implementation (``onnx.reference``, numpy) of the same one-node
model made double. The reference is first
checked to compute what onnxruntime computes in float32. It also checks the adjoint identity
<J t, c> = <t, J^T c> for random t, c, in float64 where onnxruntime runs the derivative
graphs in double (float32 otherwise)."""
from __future__ import annotations

import importlib

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import numpy_helper as nh
from onnx.reference import ReferenceEvaluator

from jacli.backends.onnx.derive import build_jvp, build_vjp
from jacli.backends.onnx.float64 import to_float64
from jacli.errors import UnsupportedError

from onnx_harness import RNG, _session, as64, assert_close, jacobians

_FLOATS = (TP.FLOAT, TP.FLOAT16, TP.BFLOAT16)


def _double_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The one-node model with float inputs, outputs and initializers made double (for the
    reference evaluator, which computes in the inputs' precision)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type in _FLOATS:
            vi.type.tensor_type.elem_type = TP.DOUBLE
    for i, t in enumerate(g.initializer):
        if t.data_type in _FLOATS:
            g.initializer[i].CopyFrom(nh.from_array(nh.to_array(t).astype(np.float64), t.name))
    for node in g.node:  # the statistics are computed in float32 unless told otherwise
        if node.op_type == "GroupNormalization":  # (the reference has double stashes for it only)
            for a in [a for a in node.attribute if a.name == "stash_type"]:
                node.attribute.remove(a)
            node.attribute.append(onnx.helper.make_attribute("stash_type", TP.DOUBLE))
    return out


def fd_numpy(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of a numpy definition, in float64."""
    x = x.astype(np.float64)
    cols = []
    for e in np.eye(x.size):
        d = (eps * e).reshape(x.shape)
        cols.append(((f(x + d) - f(x - d)) / (2 * eps)).ravel())
    return np.array(cols).T


class Reference:
    """y(x) in float64 by onnx.reference (some of onnxruntime's double kernels compute in
    float32, e.g. Shrink's); ``model``: the float64 model onnxruntime runs, None where it has
    no double kernel."""

    def __init__(self, model: onnx.ModelProto, y: str):
        self.y = y
        self._run = ReferenceEvaluator(_double_graph(model)).run
        try:
            self.model = to_float64(model)
        except UnsupportedError:
            self.model = None
        self.ort = self.model is not None

    def __call__(self, feeds: dict) -> np.ndarray:
        return np.asarray(self._run([self.y], feeds)[0])


def fd64(ref: Reference, feeds64: dict, x: str, eps: float = 1e-6) -> np.ndarray:
    xs = feeds64[x]
    cols = []
    for e in np.eye(xs.size):
        d = (eps * e).reshape(xs.shape)
        cols.append(((ref({**feeds64, x: xs + d}) - ref({**feeds64, x: xs - d})) / (2 * eps)).ravel())
    return np.array(cols).T


def basis_images(model: onnx.ModelProto, feeds: dict, x: str = "x", y: str = "y") -> np.ndarray:
    """The Jacobian of a map affine in x: onnxruntime's images of the basis vectors, less
    the image of 0 (e.g. Resize's extrapolation value)."""
    s = _session(model)
    xs = feeds[x]
    offset = s.run([y], {**feeds, x: np.zeros_like(xs)})[0].ravel().astype(np.float64)
    return np.array([s.run([y], {**feeds, x: e.reshape(xs.shape)})[0].ravel() - offset
                     for e in np.eye(xs.size, dtype=xs.dtype)]).T


def check_rule(model: onnx.ModelProto, feeds: dict, x: str = "x", y: str = "y", tol: float = 1e-4,
               expected: np.ndarray | None = None, nonzero: bool = True, linear: bool = False,
               reference: bool = True) -> np.ndarray:
    """Rows (VJP) and columns (JVP) of dy/dx against float64 FD of the reference (or
    ``expected``), plus the adjoint identity. Returns the reference Jacobian.

    ``linear``: y is affine in x; the Jacobian is also compared with onnxruntime's images of
    the basis vectors, and where onnxruntime's kernel computes another function than
    onnx.reference (it does for a few Resize node tests) with those only. ``reference=False``:
    ``expected`` comes from elsewhere, onnx.reference computing another function there."""
    ref = Reference(model, y)
    feeds64 = as64(feeds)
    out32 = _session(model).run([y], feeds)[0]
    try:
        values = ref(feeds64)
    except (RuntimeError, ValueError):  # onnx.reference lacks a few (Upsample nearest x1.5, Resize-10)
        assert linear or not reference, "onnx.reference cannot evaluate the operator"
        values = None
    same = values is not None and np.allclose(out32, values, rtol=1e-5,
                                              atol=1e-5 * max(1.0, float(np.abs(out32).max())))
    assert same or linear or not reference, "onnx.reference and onnxruntime compute different functions"
    if expected is None and same:
        expected = fd64(ref, feeds64, x)
    if linear:
        images = basis_images(model, feeds, x, y)
        if expected is not None:
            assert_close(images, expected, 1e-5)
        expected = images
    if nonzero:
        assert np.abs(expected).max() > 0  # the case exercises a non-trivial derivative
    rows, cols = jacobians(model, feeds, x, y)
    assert_close(rows, expected, tol)
    assert_close(cols, expected, tol)
    # adjoint identity, in float64 when onnxruntime runs the derivative graphs in double
    m, f = (ref.model, feeds64) if ref.ort else (model, feeds)
    vjp, jvp = _session(build_vjp(m, [x], [y])), _session(build_jvp(m, [x], [y]))
    dtype = f[x].dtype
    t = RNG.standard_normal(f[x].shape).astype(dtype)
    c = RNG.standard_normal(out32.shape).astype(dtype)
    jt = jvp.run(None, {**f, f"tan:{x}": t})[0]
    jtc = vjp.run(None, {**f, f"ct:{y}": c})[0]
    lhs, rhs = float(np.vdot(jt.astype(np.float64), c)), float(np.vdot(t, jtc.astype(np.float64)))
    scale = float(np.abs(jt).sum() * np.abs(c).max() + np.abs(t).max() * np.abs(jtc).sum()) + 1e-30
    assert abs(lhs - rhs) <= (1e-12 if ref.ort else 1e-5) * scale, (lhs, rhs)
    return expected


# ----------------------------------------------------------------- onnx's node tests
def node_tests(module: str, op: str) -> list:
    """onnx's node test cases for ``op`` (from onnx.backend.test.case.node.<module>; importing
    the module runs its export functions, which record their cases): (name, model, inputs)."""
    import onnx.backend.test.case.node as cases

    importlib.import_module(f"onnx.backend.test.case.node.{module}")
    found = []
    for case in cases._NodeTestCases:
        nodes = case.model.graph.node
        if len(nodes) == 1 and nodes[0].op_type == op and "expanded" not in case.name:
            found.append((case.name[len("test_"):], case.model, list(case.data_sets[0][0])))
    return found


def as_rule_case(model: onnx.ModelProto, inputs: list, wrt: int = 0, of: int = 0, x_values=None):
    """A node test as a rule test: input ``wrt`` is the graph input ``x`` (float32), every
    other input an initializer with the test's value, output ``of`` the one output ``y``."""
    node = onnx.NodeProto()
    node.CopyFrom(model.graph.node[0])
    names = list(node.input)
    inits, feeds = [], {}
    renamed, values = [], iter(inputs)  # the node test's data: one value per named input
    for i, name in enumerate(names):
        if not name:
            renamed.append("")
            continue
        value = np.asarray(next(values))
        if value.dtype == np.float64 or value.dtype == np.float16:
            value = value.astype(np.float32)
        if i == wrt:
            feeds["x"] = (value if x_values is None else x_values(value)).astype(np.float32)
            renamed.append("x")
        else:
            inits.append(nh.from_array(value, f"in{i}"))
            renamed.append(f"in{i}")
    del node.input[:]
    node.input.extend(renamed)
    outs = list(node.output)
    del node.output[:]
    node.output.extend(["y" if k == of else (f"out{k}" if o else "") for k, o in enumerate(outs)])
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", TP.FLOAT, feeds["x"].shape)],
        [onnx.helper.make_tensor_value_info("y", TP.FLOAT, None)], initializer=inits)
    out = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    shape = _session(out).run(["y"], feeds)[0].shape  # declared (shape inference misses some, e.g. MVN's)
    out.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info("y", TP.FLOAT, shape))
    return out, feeds
