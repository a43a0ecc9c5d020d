"""Input handling of ONNX models that jacli used to refuse although it can differentiate
them: --no-batch with inputs of different leading sizes (data + axes/indices/starts),
scalars and empty arrays as whole arrays, initializers also listed as graph inputs (IR 3),
and onnxruntime's own log lines kept off the terminal."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from jacli import api
from jacli.errors import JacliError

from conftest import run_jacli
RNG = np.random.default_rng(7)


def _save(tmp_path, name, nodes, inputs, outputs, inits=(), opset=17, ir=None):
    graph = oh.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    if ir is not None:
        model.ir_version = ir
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return api.load(str(path))


def _vi(name, shape, dtype=TP.FLOAT):
    return oh.make_tensor_value_info(name, dtype, shape)


def test_no_batch_with_data_and_axes_inputs_of_other_leading_sizes(tmp_path):
    m = _save(tmp_path, "rsum", [oh.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
              [_vi("x", [3, 4, 5]), _vi("axes", [1], TP.INT64)], [_vi("y", [3, 5])])
    x = RNG.standard_normal((3, 4, 5)).astype(np.float32)
    J = api.jacobian(m, {"x": x, "axes": np.array([1], np.int64)}, wrt="x", batch=False)
    expected = np.einsum("ac,bd,e->abcde", np.eye(3), np.eye(5), np.ones(4))  # y[a,b] = sum_k x[a,k,b]
    np.testing.assert_allclose(J, expected.transpose(0, 1, 2, 4, 3), atol=1e-6)
    # the same file, with fixed-size pieces it would be refused: now also through the CLI
    np.savez(tmp_path / "in.npz", x=x, axes=np.array([1], np.int64))
    r = run_jacli("compute", tmp_path / "rsum.onnx", tmp_path / "in.npz", "--no-batch", "--json")
    assert r.code == 0, r.stderr


def test_no_batch_slice_and_gather_with_index_inputs(tmp_path):
    m = _save(tmp_path, "slice", [oh.make_node("Slice", ["x", "starts", "ends", "axes"], ["s"]),
                                  oh.make_node("Gather", ["s", "idx"], ["y"], axis=0)],
              [_vi("x", [5, 3]), _vi("starts", [1], TP.INT64), _vi("ends", [1], TP.INT64),
               _vi("axes", [1], TP.INT64), _vi("idx", [2], TP.INT64)], [_vi("y", [2, 2])])
    x = RNG.standard_normal((5, 3)).astype(np.float32)
    feeds = {"x": x, "starts": np.array([1]), "ends": np.array([3]), "axes": np.array([1]), "idx": np.array([4, 0])}
    for mode in ("forward", "reverse"):
        J = api.jacobian(m, feeds, wrt="x", batch=False, mode=mode)
        expected = np.zeros((2, 2, 5, 3))
        for i, row in enumerate([4, 0]):
            for j in range(2):
                expected[i, j, row, 1 + j] = 1
        np.testing.assert_array_equal(J, expected)


def test_scalar_inputs_are_whole_arrays_and_the_message_names_wrt(tmp_path):
    m = _save(tmp_path, "clip", [oh.make_node("Clip", ["x", "lo", "hi"], ["y"])],
              [_vi("x", [4]), _vi("lo", []), _vi("hi", [])], [_vi("y", [4])])
    feeds = {"x": np.array([-2, -0.5, 0.5, 2], np.float32), "lo": np.float32(-1), "hi": np.float32(1)}
    J = api.jacobian(m, feeds, wrt="x", batch=False)
    np.testing.assert_array_equal(J, np.diag([0.0, 1, 1, 0]))
    full = api.jacobian(m, feeds, batch=False)  # the bounds are inputs too: scalars, whole
    np.testing.assert_array_equal(full["dy/dlo"], [1.0, 0, 0, 0])
    np.testing.assert_array_equal(full["dy/dhi"], [0, 0, 0, 1.0])
    d = _save(tmp_path, "drop", [oh.make_node("Dropout", ["x", "ratio"], ["y"])],
              [_vi("x", [4]), _vi("ratio", [])], [_vi("y", [4])], opset=13)
    with pytest.raises(JacliError, match=r"input 1 \('ratio'\); differentiate with respect to the other inputs "
                                         r"only with --wrt x \(or use --method fd\)"):
        api.jacobian(d, {"x": feeds["x"], "ratio": np.float32(0.5)}, batch=False)
    with pytest.raises(JacliError, match="leading batch axis.*--no-batch"):  # batch mode: no shared batch axis
        api.jacobian(m, feeds, wrt="x")


def test_empty_axes_input_reduces_everything(tmp_path):
    m = _save(tmp_path, "empty", [oh.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
              [_vi("x", [2, 3]), _vi("axes", [0], TP.INT64)], [_vi("y", [1, 1])])
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    J = api.jacobian(m, {"x": x, "axes": np.zeros(0, np.int64)}, wrt="x", batch=False)
    np.testing.assert_array_equal(J, np.ones((1, 1, 2, 3)))


def _ir3_model(tmp_path):
    """MatMul + Tanh + Gemm whose weights are initializers listed as graph inputs (IR 3,
    opset 9), one of them unused, as in the old model zoo."""
    w = RNG.standard_normal((4, 5)).astype(np.float32)
    gw = RNG.standard_normal((5, 3)).astype(np.float32)
    gb = RNG.standard_normal(3).astype(np.float32)
    inits = [nh.from_array(w, "W"), nh.from_array(gw, "GW"), nh.from_array(gb, "GB"),
             nh.from_array(np.zeros((1, 1), np.float32), "unused_queue")]
    nodes = [oh.make_node("MatMul", ["x", "W"], ["c"]), oh.make_node("Tanh", ["c"], ["t"]),
             oh.make_node("Gemm", ["t", "GW", "GB"], ["y"])]
    inputs = [_vi("x", ["batch", 4])] + [_vi(t.name, list(t.dims)) for t in inits]
    m = _save(tmp_path, "ir3", nodes, inputs, [_vi("y", ["batch", 3])], inits, opset=9, ir=3)
    return m, (w, gw, gb)


def test_initializers_listed_as_graph_inputs_work_in_every_derived_graph(tmp_path):
    m, (w, gw, gb) = _ir3_model(tmp_path)
    assert m.input_names() == ["x"]  # initializer-backed inputs are defaults, not inputs to feed
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    h = np.tanh(x.astype(np.float64) @ w)
    expected = np.einsum("kj,bk,ik->bji", gw, 1 - h**2, w)  # (B, 3, 4)
    for mode in ("forward", "reverse"):
        np.testing.assert_allclose(api.jacobian(m, x, mode=mode), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(api.jacobian(m, x, method="fd"), expected, rtol=1e-6, atol=1e-7)  # float64 graph
    assert api.check(m, x).passed
    r = run_jacli("export-grad", tmp_path / "ir3.onnx", "-o", tmp_path / "g.onnx", "--mode", "jvp")
    assert r.code == 0, r.stderr
    g = onnx.load(tmp_path / "g.onnx")
    assert "unused_queue" not in {i.name for i in g.graph.input}


def test_onnxruntime_log_lines_never_reach_the_terminal(tmp_path, capfd):
    _ir3_model(tmp_path)  # onnxruntime warns about its unused initializer-input on every session
    capfd.readouterr()
    r = run_jacli("check", tmp_path / "ir3.onnx", "--random", "1", "--fd", "--directions", "1")
    out, err = capfd.readouterr()
    assert r.code == 0, r.stderr
    assert "onnxruntime" not in err + r.stderr and "Initializer" not in err + r.stderr
