"""Shared helpers for ONNX derivative-rule tests: one-node models, the Jacobian assembled
from a rule's VJP graph (rows) and JVP graph (columns), and float64 finite differences."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from jacli.backends.onnx.derive import build_jvp, build_vjp

RNG = np.random.default_rng(1234)


# ----------------------------------------------------------------------------- helpers
def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def jacobians(model, feeds, x="x", y="y", check=True):
    """Full Jacobian d y / d x (y.size, x.size) from the VJP graph (one-hot cotangents,
    rows) and from the JVP graph (one-hot tangents, columns); both graphs checked."""
    vjp, jvp = build_vjp(model, [x], [y]), build_jvp(model, [x], [y])
    if check:
        onnx.checker.check_model(vjp, full_check=True)
        onnx.checker.check_model(jvp, full_check=True)
    out = _session(model).run([y], feeds)[0]
    xs = feeds[x]
    sv, sj = _session(vjp), _session(jvp)
    rows = []
    for e in np.eye(out.size, dtype=out.dtype):
        (g,) = sv.run(None, {**feeds, f"ct:{y}": e.reshape(out.shape)})
        assert g.shape == xs.shape and g.dtype == xs.dtype
        rows.append(g.ravel())
    cols = []
    for e in np.eye(xs.size, dtype=xs.dtype):
        (t,) = sj.run(None, {**feeds, f"tan:{x}": e.reshape(xs.shape)})
        assert t.shape == out.shape and t.dtype == out.dtype
        cols.append(t.ravel())
    return np.array(rows).reshape(out.size, xs.size), np.array(cols).T.reshape(out.size, xs.size)


def fd_jacobian(model, feeds, x="x", y="y", eps=1e-6):
    """Central finite differences (run on a float64 model)."""
    s = _session(model)
    xs = feeds[x]
    cols = []
    for e in np.eye(xs.size):
        d = (eps * e).reshape(xs.shape)
        plus = s.run([y], {**feeds, x: xs + d})[0]
        minus = s.run([y], {**feeds, x: xs - d})[0]
        cols.append(((plus - minus) / (2 * eps)).ravel())
    return np.array(cols).T


def assert_close(actual, expected, tol):
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def as64(feeds):
    return {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}


def distinct(shape, lo=-2.0, hi=2.0):
    """Random values at least (hi - lo) / size apart: no ties or kinks for max/min/relu."""
    size = int(np.prod(shape))
    grid = np.linspace(lo, hi, size + 1)[:-1] + (hi - lo) / (2 * size)
    return RNG.permutation(grid).reshape(shape).astype(np.float32)


def node_model(op, inputs, attrs=None, opset=17, outputs=("y",), out_type=TP.FLOAT):
    """A one-node model. ``inputs``: name -> shape (a float graph input, fed at random) or
    ndarray (an initializer); "" skips an optional input. Returns (model, feeds)."""
    graph_inputs, inits, feeds = [], [], {}
    for name, spec in inputs.items():
        if isinstance(spec, np.ndarray):
            inits.append(nh.from_array(spec, name))
        elif name:
            graph_inputs.append(oh.make_tensor_value_info(name, TP.FLOAT, spec))
            feeds[name] = RNG.standard_normal(spec).astype(np.float32)
    node = oh.make_node(op, list(inputs), list(outputs), name=f"{op.lower()}_node", **(attrs or {}))
    outs = [oh.make_tensor_value_info(o, out_type, None) for o in outputs]
    graph = oh.make_graph([node], "g", graph_inputs, outs, initializer=inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)]), feeds


def I64(*values):
    return np.array(values, np.int64)


def F32(*values):
    return np.array(values, np.float32)
