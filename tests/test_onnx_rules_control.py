"""Control flow on the differentiated path: Loop and Scan unrolled, If with a condition
known before run time inlined, If with a run-time condition differentiated branch by
branch; each in both modes against float64 finite differences and the adjoint identity,
on onnx's node cases and on graphs in the shapes exporters emit (tf2onnx while loops)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from onnx_cases import case_model, check_model, keras_via_tf2onnx, node_cases, session  # noqa: E402

RNG = np.random.default_rng(13)
F, I64, B = TP.FLOAT, TP.INT64, TP.BOOL


def _r(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _vi(name, dtype, shape):
    return oh.make_tensor_value_info(name, dtype, shape)


@pytest.mark.parametrize("name", ["test_loop11", "test_scan9_sum", "test_scan9_multi_state"])
def test_onnx_node_cases(name):
    cases = {**node_cases("loop", "Loop"), **node_cases("scan", "Scan")}
    node, inputs, opsets, _ = cases[name]
    model, feeds = case_model(node, inputs, 11, opsets, constants=node.input[:2] if "loop" in name else ())
    check_model(model, feeds)


def _loop_model(body_nodes, body_cond, trip, cond, carried, scans, opset=17):
    """A Loop on x (3, 4) and a weight w (4,): carried y (4,) starting at x[0]; the body
    may use the iteration number (it), x and w from the outer scope."""
    body = oh.make_graph(body_nodes, "body",
                         [_vi("it", I64, []), _vi("c_in", B, []), _vi("y_in", F, [4])],
                         [_vi(body_cond, B, [])] + [_vi(o, F, [4]) for o in [carried] + scans])
    init = [nh.from_array(np.array(trip, np.int64), "M")] if trip is not None else []
    nodes = [oh.make_node("Gather", ["x", "zero"], ["y0"], axis=0),
             oh.make_node("Loop", ["M" if trip is not None else "", cond, "y0"], ["y_final"] + [f"s{i}" for i in
                                                                                   range(len(scans))], body=body)]
    init += [nh.from_array(np.array(0, np.int64), "zero"), nh.from_array(np.array(True), "true")]
    graph = oh.make_graph(nodes, "loop", [_vi("x", F, [3, 4]), _vi("w", F, [4])],
                          [_vi("y_final", F, [4])] + [_vi(f"s{i}", F, None) for i in range(len(scans))], init)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])


_STEP = [oh.make_node("Gather", ["x", "it"], ["xi"], axis=0),  # x[it mod 3] through Mod
         oh.make_node("Mul", ["y_in", "w"], ["yw"]), oh.make_node("Add", ["yw", "xi"], ["pre"]),
         oh.make_node("Tanh", ["pre"], ["y_out"]), oh.make_node("Mul", ["y_out", "y_in"], ["scan"])]


def test_loop_with_static_trip_count_and_scan_output():
    model = _loop_model([oh.make_node("Identity", ["c_in"], ["c_out"])] + _STEP, "c_out", 3, "true", "y_out",
                        ["scan"])
    check_model(model, {"x": _r(3, 4), "w": _r(4)})


def test_loop_whose_condition_follows_the_iteration_count():
    """tf2onnx's while loops: a large trip count, the condition computed from the counter."""
    cond = [oh.make_node("Add", ["it", "one"], ["next"]), oh.make_node("Less", ["next", "limit"], ["c_out"])]
    model = _loop_model(cond + _STEP, "c_out", 100, "true", "y_out", ["scan"])
    model.graph.initializer.extend([nh.from_array(np.array(1, np.int64), "one"),
                                    nh.from_array(np.array(3, np.int64), "limit")])
    feeds = {"x": _r(3, 4), "w": _r(4)}
    assert session(model).run(["s0"], feeds)[0].shape == (3, 4)  # three iterations run
    check_model(model, feeds)


def test_loop_with_run_time_condition_is_refused():
    from jacli.backends.onnx.derive import build_vjp
    from jacli.errors import UnsupportedError

    cond = [oh.make_node("ReduceSum", ["y_in"], ["total"], keepdims=0),
            oh.make_node("Less", ["total", "ten"], ["c_out"])]
    model = _loop_model(cond + _STEP, "c_out", 5, "true", "y_out", [])
    model.graph.initializer.append(nh.from_array(np.array(10, np.float32), "ten"))
    with pytest.raises(UnsupportedError, match=r"'Loop'.*loop condition known only at run time"):
        build_vjp(model, ["x"], ["y_final"])


def test_scan_with_reverse_input_and_transposed_output():
    body = oh.make_graph([oh.make_node("Mul", ["s_in", "a"], ["m"]), oh.make_node("Add", ["m", "b_"], ["s_out"]),
                          oh.make_node("Sin", ["s_out"], ["o"])], "body",
                         [_vi("s_in", F, [2]), _vi("a", F, [2]), _vi("b_", F, [2])],
                         [_vi("s_out", F, [2]), _vi("o", F, [2])])
    node = oh.make_node("Scan", ["s0", "xa", "xb"], ["s_final", "ys"], body=body, num_scan_inputs=2,
                        scan_input_axes=[0, 1], scan_input_directions=[0, 1], scan_output_axes=[1],
                        scan_output_directions=[1])
    model, feeds = case_model(node, [_r(2), _r(4, 2), _r(2, 4)], 17)
    check_model(model, feeds)


def _if_model(cond_from_input: bool):
    then = oh.make_graph([oh.make_node("Mul", ["x", "x"], ["t"])], "then", [], [_vi("t", F, [3])])
    other = oh.make_graph([oh.make_node("Sin", ["x"], ["s"]), oh.make_node("Mul", ["s", "w"], ["e"])], "else", [],
                          [_vi("e", F, [3])])
    nodes = [oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="branch")]
    inits = [nh.from_array(np.array(False), "c")]
    if cond_from_input:
        nodes = [oh.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
                 oh.make_node("Greater", ["total", "zero"], ["c"])] + nodes
        inits = [nh.from_array(np.array(0, np.float32), "zero")]
    graph = oh.make_graph(nodes, "if", [_vi("x", F, [3]), _vi("w", F, [3])], [_vi("y", F, [3])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def test_if_with_a_constant_condition_is_its_branch():
    from onnx_cases import decomposed

    model = _if_model(False)
    assert "If" not in {n.op_type for n in decomposed(model, ["x", "w"], ["y"]).graph.node}
    check_model(model, {"x": _r(3), "w": _r(3)})


@pytest.mark.parametrize("sign", [1, -1], ids=["then", "else"])
def test_if_with_a_run_time_condition_differentiates_the_branch_taken(sign):
    model = _if_model(True)
    x = np.abs(_r(3)) * sign
    check_model(model, {"x": x, "w": _r(3)})


def test_keras_gru_and_simple_rnn_through_tf2onnx_loops_match_tensorflow():
    import tensorflow as tf
    import onnx

    from jacli.backends.onnx.derive import build_jvp, build_vjp

    def net(dtype):
        inp = tf.keras.Input((5, 3), dtype=dtype)
        x = tf.keras.layers.GRU(4, return_sequences=True, dtype=dtype)(inp)
        x = tf.keras.layers.SimpleRNN(3, dtype=dtype)(x)
        return tf.keras.Model(inp, tf.keras.layers.Dense(2, dtype=dtype)(x))

    xs = _r(2, 5, 3)
    proto, ref = keras_via_tf2onnx(net, xs, seed=4)  # ref: (2, 2, 5, 3)
    assert sum(n.op_type == "Loop" for n in proto.graph.node) == 2  # tf2onnx leaves these as while loops
    out = proto.graph.output[0].name
    vjp, jvp = session(build_vjp(proto, ["x"], [out])), session(build_jvp(proto, ["x"], [out]))
    onnx.checker.check_model(build_vjp(proto, ["x"], [out]))
    for i in range(2):
        ct = np.zeros((2, 2), np.float32)
        ct[:, i] = 1
        (g,) = vjp.run(None, {"x": xs, f"ct:{out}": ct})
        np.testing.assert_allclose(g, ref[:, i], rtol=1e-4, atol=1e-6)
    t = _r(2, 5, 3)
    (jt,) = jvp.run(None, {"x": xs, "tan:x": t})
    np.testing.assert_allclose(jt, np.einsum("boij,bij->bo", ref, t), rtol=1e-4, atol=1e-6)


def test_symbolic_shape_inference_imports_no_torch():
    """onnxruntime's symbolic shape inference (run when onnx's leaves a rank open, as for
    tf2onnx's while loops) is loaded without its package's __init__, which imports torch."""
    import subprocess
    import sys

    probe = ("import sys; from jacli.backends.onnx.graph import _symbolic_shape_module; "
             "print(_symbolic_shape_module().SymbolicShapeInference.__name__, 'torch' in sys.modules)")
    from conftest import ROOT

    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.split()
    assert out == ["SymbolicShapeInference", "False"]
