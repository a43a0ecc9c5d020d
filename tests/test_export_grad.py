"""``jacli export-grad``: the derivative graph as a standalone ONNX model that passes the
checker and reproduces the Jacobian in plain onnxruntime."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort

from conftest import SAMPLES, mlp_jacobian


def _session(path):
    onnx.checker.check_model(onnx.load(path), full_check=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_vjp_graph_gives_jacobian_rows(jacli, tmp_path, weights):
    out = tmp_path / "vjp.onnx"
    r = jacli("export-grad", SAMPLES / "mlp.onnx", "-o", out, "--json")
    assert r.code == 0, r.stderr
    sig = json.loads(r.stdout)
    assert [i["name"] for i in sig["inputs"]] == ["x", "ct:probs"] and sig["outputs"][0]["name"] == "grad:x"
    sess = _session(out)
    x = np.load(SAMPLES / "mlp_input.npy")
    J = mlp_jacobian(weights, x)
    for row in (0, 7):
        ct = np.zeros((4, 10), np.float32)
        ct[:, row] = 1
        (g,) = sess.run(None, {"x": x, "ct:probs": ct})
        np.testing.assert_allclose(g, J[:, row], atol=1e-6 * np.abs(J).max())


def test_jvp_graph_gives_jacobian_columns(jacli, tmp_path, weights):
    out = tmp_path / "jvp.onnx"
    assert jacli("export-grad", SAMPLES / "multi.onnx", "-o", out, "--mode", "jvp", "--wrt", "b", "--of", "p", "-q").code == 0
    sess = _session(out)
    assert [i.name for i in sess.get_inputs()] == ["a", "b", "tan:b"]
    d = np.load(SAMPLES / "multi_input.npz")
    t = np.zeros((3, 4), np.float32)
    t[:, 2] = 1
    (jt,) = sess.run(["jvp:p"], {"a": d["a"], "b": d["b"], "tan:b": t})
    # p = a * (b V): dp/db[:, j] = a * V[j]
    np.testing.assert_allclose(jt, d["a"] * weights["V"][2], rtol=1e-6)


def test_export_grad_errors(jacli, tmp_path):
    r = jacli("export-grad", SAMPLES / "mlp.pt", "-o", tmp_path / "g.onnx")
    assert r.code == 2 and r.stderr.startswith("Error: export-grad works on ONNX models")
    r = jacli("export-grad", SAMPLES / "multi.onnx", "-o", tmp_path / "g.onnx", "--wrt", "zz")
    assert r.code == 2 and "--wrt 'zz'" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_rule_names_operator_and_suggests_fd(jacli, tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Tanh", ["x"], ["t"], name="act"), helper.make_node("DFT", ["t"], ["y"], name="the_dft")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 2])])
    path = tmp_path / "dft.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((2, 2, 2)).astype(np.float32))
    r = jacli("compute", path, tmp_path / "x.npy")
    assert r.code == 2
    assert "DFT" in r.stderr and "the_dft" in r.stderr and "--method fd" in r.stderr
    r = jacli("compute", path, tmp_path / "x.npy", "--method", "fd", "--json")
    assert r.code == 0, r.stderr
