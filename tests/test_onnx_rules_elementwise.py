"""Derivative rules of the activations and elementwise functions (rules/elementwise.py) on
the attribute sets and inputs of onnx's own node tests, against float64 finite differences of
an independent evaluation (onnxruntime's double kernels or onnx.reference), VJP and JVP,
plus the adjoint identity."""
from __future__ import annotations

import numpy as np
import pytest

from onnx_harness import jacobians, node_model
from onnx_rules_check import as_rule_case, check_rule, node_tests

UNARY = ["Mish", "Swish", "Celu", "ThresholdedRelu", "Shrink", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh",
         "Asinh", "Acosh", "Atanh"]


def _cases():
    for op in UNARY:
        for name, model, inputs in node_tests(op.lower(), op):
            if inputs[0].size > 60:  # keep the Jacobians small: the node tests' big inputs, cut down
                inputs = [inputs[0].reshape(-1)[:24].reshape(2, 3, 4)]
            yield pytest.param(model, inputs, 0, id=name)
    for name, model, inputs in node_tests("mod", "Mod"):
        if inputs[0].dtype.kind == "f" and "edge_cases" not in name:  # inf, nan, division by 0
            for wrt in (0, 1):
                yield pytest.param(model, inputs, wrt, id=f"{name}-wrt{wrt}")


def _away_from_kinks(op, value):
    """The node tests' inputs, nudged off the points where the function has a kink
    (finite differences straddling one measure neither side)."""
    value = np.asarray(value, np.float32).copy()
    kinks = {"ThresholdedRelu": [0.0, 1.0, 2.0], "Shrink": [0.5, -0.5, 1.5, -1.5], "Celu": [0.0],
             "Acosh": [1.0]}.get(op, [])
    for k in kinks:
        near = np.abs(value - k) < 1e-3
        value[near] += 0.25
    return value


CASES = list(_cases())


@pytest.mark.parametrize("model, inputs, wrt", CASES)
def test_elementwise_rule_on_onnx_node_test(model, inputs, wrt):
    op = model.graph.node[0].op_type
    case, feeds = as_rule_case(model, inputs, wrt=wrt, x_values=lambda v: _away_from_kinks(op, v))
    if op == "Mod":
        # away from the jumps of fmod (a multiple of b), where the derivative does not exist
        a, c = (feeds["x"], np.asarray(inputs[1])) if wrt == 0 else (np.asarray(inputs[0]), feeds["x"])
        q = a / c
        assert np.all(np.abs(q - np.round(q)) > 1e-3)
    check_rule(case, feeds, nonzero=op not in ("ThresholdedRelu", "Shrink") or bool(np.any(feeds["x"] > 0.6)))


@pytest.mark.parametrize("fmod, opset, quotients", [(1, 13, [3.0, -3.0, -2.0]), (0, 28, [3.0, -4.0, -3.0])])
def test_mod_derivative_wrt_divisor_is_minus_the_quotient(fmod, opset, quotients):
    """d mod(a, b) / db = -q: q = trunc(a / b) for fmod=1 (torch.fmod), floor(a / b) for
    fmod=0 (torch.remainder), negative quotients included."""
    model, _ = node_model("Mod", {"a": np.array([[7.5, -7.5, 2.25]], np.float32), "x": [1, 3]}, {"fmod": fmod},
                          opset=opset)
    feeds = {"x": np.array([[2.0, 2.0, -1.0]], np.float32)}
    rows, cols = jacobians(model, feeds)
    np.testing.assert_array_equal(np.diag(rows), [-q for q in quotients])
    np.testing.assert_array_equal(cols, rows)


