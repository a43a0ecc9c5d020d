"""The ONNX project's own node test cases (``onnx.backend.test.case.node.*``) as one-node
models with their inputs, and the checks every rule test runs on a model: the VJP and JVP
graphs against float64 finite differences, and against each other through the adjoint
identity <J t, c> = <t, J^T c>."""
from __future__ import annotations

import importlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper as oh
from onnx import numpy_helper as nh

from jacli.backends.onnx import derive
from jacli.backends.onnx.float64 import to_float64
from jacli.backends.onnx.graph import Info, _prepare

RNG = np.random.default_rng(2024)


def node_cases(module: str, cls: str) -> dict:
    """{case name: (node, inputs, opset imports, expected outputs)} from the export_* functions of an onnx node-test class,
    without generating every other operator's cases (onnx's collect_testcases takes ~20 s)."""
    mod = importlib.import_module(f"onnx.backend.test.case.node.{module}")
    found = {}

    def expect(node, inputs, outputs, name, **kwargs):
        found[name] = (node, list(inputs), kwargs.get("opset_imports"), list(outputs))

    saved = mod.expect
    mod.expect = expect
    try:
        owner = getattr(mod, cls)
        for attr in sorted(vars(owner)):
            if attr.startswith("export"):
                getattr(owner, attr)()
    finally:
        mod.expect = saved
    return found


def case_model(node, inputs, opset: int, opset_imports=None, constants=()) -> tuple[onnx.ModelProto, dict]:
    """A model of the one node with every input a graph input (as the node tests have them),
    except those named in ``constants`` (initializers)."""
    graph_inputs, feeds, inits = [], {}, []
    for name, value in zip(node.input, inputs):
        if not name:
            continue
        value = np.asarray(value)
        if name in constants:
            inits.append(nh.from_array(value, name))
            continue
        graph_inputs.append(oh.make_tensor_value_info(name, oh.np_dtype_to_tensor_dtype(value.dtype), value.shape))
        feeds[name] = value
    outs = [oh.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in node.output if o]
    graph = oh.make_graph([node], "case", graph_inputs, outs, initializer=inits)
    model = oh.make_model(graph, opset_imports=opset_imports or [oh.make_opsetid("", opset)])
    model = onnx.shape_inference.infer_shapes(model)
    return model, feeds


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def floats(model: onnx.ModelProto, feeds: dict) -> tuple[list[str], list[str]]:
    """The float inputs (fed) and float outputs of a model."""
    wrt = [n for n, v in feeds.items() if v.dtype.kind == "f"]
    of = [o.name for o in model.graph.output if o.type.tensor_type.elem_type in (1, 11)]
    return wrt, of


def decomposed(model: onnx.ModelProto, wrt, of) -> onnx.ModelProto:
    """The model as the drivers differentiate it (decompositions substituted)."""
    prepared = _prepare(model)
    return derive._decomposed(prepared, Info(prepared), wrt, of)


def reference64(model: onnx.ModelProto, wrt, of, feeds64):
    """A float64 evaluator of the function (its decomposition where the operator itself has
    no double kernel), or None when onnxruntime cannot evaluate it in float64."""
    for candidate in (model, decomposed(model, wrt, of)):
        try:
            s = session(to_float64(candidate))
            s.run(of, feeds64)
        except Exception:  # no double kernel (UnsupportedError, or onnxruntime's at run time)
            continue
        return lambda feeds: s.run(of, feeds)
    return None


def check_model(model, feeds, wrt=None, of=None, tol=2e-4, fd_eps=1e-6):
    """The VJP and JVP graphs of ``model`` (w.r.t. ``wrt``, of ``of``; default every float
    input/output) at ``feeds``: JVP in a random direction against float64 central
    differences, VJP against the JVP by the adjoint identity, both graphs valid ONNX.
    Returns the largest relative error seen."""
    dw, do = floats(model, feeds)
    wrt, of = wrt or dw, of or do
    vjp, jvp = derive.build_vjp(model, wrt, of), derive.build_jvp(model, wrt, of)
    onnx.checker.check_model(vjp, full_check=True)
    onnx.checker.check_model(jvp, full_check=True)
    try:
        forward = session(model)
    except Exception:  # onnxruntime has no kernel for these attributes (recurrent layout=1)
        forward = session(decomposed(model, wrt, of))
    ys = dict(zip(of, forward.run(of, feeds)))
    tangents = {x: np.asarray(RNG.standard_normal(feeds[x].shape), feeds[x].dtype) for x in wrt}
    cotangents = {y: np.asarray(RNG.standard_normal(ys[y].shape), ys[y].dtype) for y in of}
    jt = dict(zip(of, session(jvp).run([f"jvp:{y}" for y in of], {**feeds, **{f"tan:{x}": t for x, t in tangents.items()}})))
    jc = dict(zip(wrt, session(vjp).run([f"grad:{x}" for x in wrt], {**feeds, **{f"ct:{y}": c for y, c in cotangents.items()}})))
    for y in of:
        assert jt[y].shape == ys[y].shape
    for x in wrt:
        assert jc[x].shape == feeds[x].shape
    lhs = sum(float(np.vdot(jt[y].astype(np.float64), cotangents[y])) for y in of)
    rhs = sum(float(np.vdot(tangents[x].astype(np.float64), jc[x])) for x in wrt)
    scale = sum(float(np.abs(jt[y]).astype(np.float64).ravel() @ np.abs(cotangents[y]).ravel()) for y in of) + 1e-12
    errors = [abs(lhs - rhs) / scale]
    f64 = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in feeds.items()}
    ref = reference64(model, wrt, of, f64)
    if ref is not None:
        plus = ref({**f64, **{x: np.asarray(f64[x] + fd_eps * tangents[x]) for x in wrt}})
        minus = ref({**f64, **{x: np.asarray(f64[x] - fd_eps * tangents[x]) for x in wrt}})
        for y, p, m in zip(of, plus, minus):
            fd = (p - m) / (2 * fd_eps)
            errors.append(float(np.abs(jt[y] - fd).max() / max(1.0, np.abs(fd).max())))
    else:  # float32 central differences of onnxruntime's own kernel, with a coarser step
        s, eps = forward, 1e-3
        plus = s.run(of, {**feeds, **{x: np.asarray(feeds[x] + eps * tangents[x], feeds[x].dtype) for x in wrt}})
        minus = s.run(of, {**feeds, **{x: np.asarray(feeds[x] - eps * tangents[x], feeds[x].dtype) for x in wrt}})
        for y, p, m in zip(of, plus, minus):
            fd = (p.astype(np.float64) - m) / (2 * eps)
            errors.append(float(np.abs(jt[y] - fd).max() / max(1.0, np.abs(fd).max())) * tol / 2e-2)
    assert max(errors) < tol, (errors, ref is not None)
    return max(errors)


def check_decomposition(model, feeds, expected=None, atol=2e-5, of=None):
    """The decomposition computes what onnxruntime's kernel of the operator computes (or,
    where onnxruntime has none, the ``expected`` outputs)."""
    wrt, all_of = floats(model, feeds)
    of = of or all_of
    expanded = decomposed(model, wrt, of)
    ops = {n.op_type for n in expanded.graph.node}
    assert not ops & {n.op_type for n in model.graph.node}, ops
    if expected is None:
        expected = session(model).run(of, feeds)
    for y, a, b in zip(of, expected, session(expanded).run(of, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=atol, err_msg=y)


def keras_via_tf2onnx(net, xs: np.ndarray, seed: int) -> tuple[onnx.ModelProto, np.ndarray]:
    """``net(dtype)`` (a Keras model builder) converted by tf2onnx at opset 17 with input "x",
    and the reference: TensorFlow's float64 batch Jacobian at ``xs`` of ``net("float64")``
    carrying the same weights."""
    import tensorflow as tf
    import tf2onnx

    tf.keras.utils.set_random_seed(seed)
    k32 = net("float32")
    spec = tf.TensorSpec((None, *xs.shape[1:]), tf.float32, name="x")
    proto, _ = tf2onnx.convert.from_keras(k32, input_signature=(spec,), opset=17)
    k64 = net("float64")
    k64.set_weights([w.astype(np.float64) for w in k32.get_weights()])
    x64 = tf.constant(xs.astype(np.float64))
    with tf.GradientTape() as tape:
        tape.watch(x64)
        y = k64(x64)
    return proto, tape.batch_jacobian(y, x64).numpy()
