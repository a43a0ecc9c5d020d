"""Derivative rules of ReduceProd, ReduceLogSum and CumProd (rules/reduce.py) on onnx's node
tests and on inputs with zeros (where the product of the other elements must not be computed
by division), against float64 finite differences of onnx.reference, VJP and JVP, plus the
adjoint identity."""
from __future__ import annotations

import numpy as np
import pytest

from onnx_harness import I64, RNG, jacobians, node_model
from onnx_rules_check import as_rule_case, check_rule, node_tests


def _node_cases():
    for module, op in [("reduceprod", "ReduceProd"), ("reduce_log_sum", "ReduceLogSum"), ("cumprod", "CumProd")]:
        for name, model, inputs in node_tests(module, op):
            if inputs[0].size and inputs[0].dtype.kind == "f":
                yield pytest.param(model, inputs, id=name)


def _positive(v):
    return RNG.uniform(0.5, 2.0, v.shape)


@pytest.mark.parametrize("model, inputs", list(_node_cases()))
def test_reduction_rule_on_onnx_node_test(model, inputs):
    op = model.graph.node[0].op_type
    case, feeds = as_rule_case(model, inputs, x_values=_positive if op == "ReduceLogSum" else None)
    check_rule(case, feeds)


WITH_ZEROS = {  # per reduced group: no zero, one zero, two zeros
    "no": np.array([1.5, -2.0, 0.5, 3.0]), "one": np.array([1.5, 0.0, -0.5, 2.0]),
    "two": np.array([0.0, 1.5, 0.0, 2.0]),
}


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_prod_with_zeros(opset, keepdims):
    x = np.stack([WITH_ZEROS["no"], WITH_ZEROS["one"], WITH_ZEROS["two"]]).astype(np.float32)
    inputs = {"x": [3, 4], "axes": I64(1)} if opset >= 18 else {"x": [3, 4]}
    attrs = {"keepdims": keepdims} if opset >= 18 else {"keepdims": keepdims, "axes": [1]}
    model, _ = node_model("ReduceProd", inputs, attrs, opset)
    expected = np.zeros((3, 12))
    for r in range(3):
        for i in range(4):
            expected[r, 4 * r + i] = np.prod(np.delete(x[r].astype(np.float64), i))
    check_rule(model, {"x": x}, expected=expected)
    assert np.count_nonzero(expected[1]) == 1 and np.count_nonzero(expected[2]) == 0


@pytest.mark.parametrize("op, feed", [("ReduceProd", None), ("ReduceLogSum", "positive")])
@pytest.mark.parametrize("axes", ["all", "noop"])
def test_reductions_over_all_or_no_axes(op, feed, axes):
    inputs = {"x": [2, 3], "axes": np.zeros(0, np.int64)}
    model, feeds = node_model(op, inputs, {"keepdims": 0, "noop_with_empty_axes": int(axes == "noop")}, 18)
    if feed:
        feeds["x"] = _positive(feeds["x"]).astype(np.float32)
    check_rule(model, feeds)


@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("axis", [1, -3])
def test_cumprod_with_zeros_3d(exclusive, reverse, axis):
    model, _ = node_model("CumProd", {"x": [2, 4, 2], "a": np.array(axis, np.int64)},
                          {"exclusive": exclusive, "reverse": reverse}, opset=26)
    x = RNG.uniform(-1.5, 1.5, (2, 4, 2)).astype(np.float32)
    x[0, 1, 0] = 0.0  # one zero in a line
    x[1, 0, 1] = x[1, 2, 1] = 0.0  # two zeros in a line
    check_rule(model, {"x": x})


def test_cumprod_dynamic_length():
    """The axis length known only at run time: the (L, L) masks are built with Range."""
    from onnx import TensorProto as TP
    from onnx import helper as oh

    model, _ = node_model("CumProd", {"x": [2, 3], "a": np.array(1, np.int64)}, opset=26)
    model.graph.input[0].CopyFrom(oh.make_tensor_value_info("x", TP.FLOAT, [2, "L"]))
    x = np.array([[0.5, 0.0, 2.0], [1.5, -1.0, 3.0]], np.float32)
    rows, cols = jacobians(model, {"x": x})
    expected = np.zeros((6, 6))
    for r in range(2):
        for i in range(3):
            for j in range(i + 1):
                expected[3 * r + i, 3 * r + j] = np.prod(np.delete(x[r, : i + 1].astype(np.float64), j))
    np.testing.assert_allclose(rows, expected, atol=1e-6)
    np.testing.assert_allclose(cols, expected, atol=1e-6)
