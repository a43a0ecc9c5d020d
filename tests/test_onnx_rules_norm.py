"""Derivative rules of the normalisations (rules/norm.py) and LpPool (rules/conv.py):
GroupNormalization (opset 18 per-group and 21 per-channel scales), RMSNormalization,
LpNormalization, MeanVarianceNormalization, LpPool, and LayerNormalization's Mean and
InvStdDev outputs, on the attribute sets and inputs of onnx's own node tests and on tables
of our own, against float64 finite differences of onnx.reference (onnxruntime has no double
kernels for most of them), VJP and JVP, plus the adjoint identity."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh

from onnx_harness import RNG, _session, assert_close, jacobians, node_model
from onnx_rules_check import as_rule_case, check_rule, fd_numpy, node_tests

NODE_TESTS = [("groupnormalization", "GroupNormalization"), ("rmsnormalization", "RMSNormalization"),
              ("lpnormalization", "LpNormalization"), ("meanvariancenormalization", "MeanVarianceNormalization"),
              ("lppool", "LpPool"), ("layernormalization", "LayerNormalization")]


def _node_cases():
    for module, op in NODE_TESTS:
        for name, model, inputs in node_tests(module, op):
            x = np.asarray(inputs[0])
            if x.size > 100:  # the node tests' biggest inputs would give 10^4-element Jacobians
                continue
            outs = [o for o in model.graph.node[0].output if o]
            for of in range(len(outs)):
                yield pytest.param(model, inputs, of, id=f"{name}-out{of}")


def _definition(node):
    """Where onnx.reference is no reference: its L1 normalisation divides by sum(x), not
    sum(|x|) (onnxruntime follows the spec), and its MVN fails in double; their definitions."""
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "LpNormalization" and attrs.get("p", 2) == 1:
        axis = attrs.get("axis", -1)
        return lambda x: x / np.abs(x).sum(axis, keepdims=True)
    if node.op_type == "MeanVarianceNormalization":
        axes = tuple(attrs.get("axes", [0, 2, 3]))
        return lambda x: (x - x.mean(axes, keepdims=True)) / (x.std(axes, keepdims=True) + 1e-9)
    return None


@pytest.mark.parametrize("model, inputs, of", list(_node_cases()))
def test_normalisation_rule_on_onnx_node_test(model, inputs, of):
    case, feeds = as_rule_case(model, inputs, of=of, x_values=lambda v: RNG.standard_normal(v.shape))
    definition = _definition(case.graph.node[0])
    if definition is None:
        check_rule(case, feeds)
        return
    expected = fd_numpy(definition, feeds["x"])
    y = _session(case).run(["y"], feeds)[0]
    np.testing.assert_allclose(y, definition(feeds["x"].astype(np.float64)), rtol=1e-5, atol=1e-5)
    rows, cols = jacobians(case, feeds)
    assert_close(rows, expected, 1e-4)
    assert_close(cols, expected, 1e-4)


LP_POOLS = [  # the node tests' attribute sets on smaller inputs, plus ceil_mode (opset 18) and p = 1
    ({"kernel_shape": [2, 2], "p": 4}, [1, 2, 5, 5], 22),
    ({"kernel_shape": [2, 2, 2], "p": 3}, [1, 1, 3, 4, 3], 22),
    ({"auto_pad": "SAME_UPPER", "kernel_shape": [2, 2], "p": 2}, [1, 2, 5, 5], 22),
    ({"auto_pad": "SAME_LOWER", "kernel_shape": [2, 2], "p": 4}, [1, 2, 5, 5], 22),
    ({"kernel_shape": [3, 3], "p": 3, "pads": [2, 2, 2, 2]}, [1, 1, 5, 5], 22),
    ({"kernel_shape": [3, 3], "p": 2, "strides": [2, 2]}, [2, 1, 6, 5], 11),
    ({"kernel_shape": [3, 2], "p": 1, "strides": [2, 2], "ceil_mode": 1}, [1, 2, 6, 5], 18),
    ({"kernel_shape": [2, 2], "p": 2, "dilations": [2, 1], "pads": [1, 0, 0, 1]}, [1, 2, 5, 5], 18),
]


@pytest.mark.parametrize("attrs, shape, opset", LP_POOLS, ids=[f"LpPool-{i}" for i in range(len(LP_POOLS))])
def test_lp_pool(attrs, shape, opset):
    model, feeds = node_model("LpPool", {"x": shape}, attrs, opset)
    if not attrs.get("ceil_mode"):
        check_rule(model, feeds)
        return
    # onnx.reference clips ceil_mode's last windows otherwise than onnxruntime, which (like
    # this definition) sums zeros past the end
    p, (kh, kw), (sh, sw) = attrs["p"], attrs["kernel_shape"], attrs["strides"]
    out = _session(model).run(["y"], feeds)[0]

    def definition(x):
        padded = np.zeros(x.shape[:2] + ((out.shape[2] - 1) * sh + kh, (out.shape[3] - 1) * sw + kw))
        padded[:, :, :x.shape[2], :x.shape[3]] = np.abs(x) ** p
        y = np.zeros(out.shape)
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                y[:, :, i, j] = padded[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].sum((2, 3)) ** (1 / p)
        return y

    np.testing.assert_allclose(out, definition(feeds["x"].astype(np.float64)), rtol=1e-5, atol=1e-6)
    check_rule(model, feeds, expected=fd_numpy(definition, feeds["x"]), reference=False)


@pytest.mark.parametrize("opset, scale_size", [(18, 2), (21, 4)])
def test_group_normalization_scales_per_group_and_per_channel(opset, scale_size):
    scale = RNG.uniform(0.5, 1.5, scale_size).astype(np.float32)
    model, feeds = node_model("GroupNormalization", {"x": [2, 4, 3], "s": scale, "b": np.zeros(scale_size,
                                                                                                np.float32)},
                              {"num_groups": 2, "epsilon": 1e-3}, opset)
    check_rule(model, feeds)


def test_rms_normalization_wrt_scale():
    model, feeds = node_model("RMSNormalization", {"a": RNG.standard_normal((2, 3, 4)).astype(np.float32),
                                                   "x": [3, 4]}, {"axis": 1}, 23)
    check_rule(model, feeds)


def test_layer_normalization_all_outputs_at_once():
    """Y, Mean and InvStdDev asked for together (each output's cotangent reaches x), with
    respect to x and to the scale (which the statistics do not depend on)."""
    from jacli.backends.onnx.derive import build_jvp, build_vjp

    node = oh.make_node("LayerNormalization", ["x", "s", "b"], ["y", "mean", "inv"], axis=1, epsilon=0.1)
    outs = [oh.make_tensor_value_info(o, TP.FLOAT, s) for o, s in [("y", [2, 3, 4]), ("mean", [2, 1, 1]),
                                                                   ("inv", [2, 1, 1])]]
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info("x", TP.FLOAT, [2, 3, 4]),
                                        oh.make_tensor_value_info("s", TP.FLOAT, [3, 4])], outs,
                          initializer=[oh.make_tensor("b", TP.FLOAT, [3, 4], np.zeros(12).tolist())])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    feeds = {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32),
             "s": RNG.uniform(0.5, 1.5, (3, 4)).astype(np.float32)}
    cts = {f"ct:{o}": RNG.standard_normal(s).astype(np.float32) for o, s in [("y", [2, 3, 4]), ("mean", [2, 1, 1]),
                                                                             ("inv", [2, 1, 1])]}
    (gx, gs) = _session(build_vjp(model, ["x", "s"], ["y", "mean", "inv"])).run(None, {**feeds, **cts})
    singles = [_session(build_vjp(model, ["x", "s"], [o])).run(None, {**feeds, f"ct:{o}": cts[f"ct:{o}"]})
               for o in ("y", "mean", "inv")]
    np.testing.assert_allclose(gx, sum(s[0] for s in singles), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gs, singles[0][1], rtol=1e-5, atol=1e-6)
    assert not singles[1][1].any() and not singles[2][1].any()
    tangents = {"tan:x": RNG.standard_normal((2, 3, 4)).astype(np.float32), "tan:s": np.zeros((3, 4), np.float32)}
    jy, jm, ji = _session(build_jvp(model, ["x", "s"], ["y", "mean", "inv"])).run(None, {**feeds, **tangents})
    lhs = sum(float(np.vdot(j, cts[f"ct:{o}"])) for j, o in zip((jy, jm, ji), ("y", "mean", "inv")))
    np.testing.assert_allclose(lhs, float(np.vdot(tangents["tan:x"], gx)), rtol=1e-4)
