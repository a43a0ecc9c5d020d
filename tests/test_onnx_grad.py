"""Derivative graphs of ONNX models (jacli.backends.onnx.derive) against independent references.

* Hand-built single-node graphs (attribute coverage, parametrised): the Jacobian assembled
  from the VJP graph (rows) and from the JVP graph (columns) is compared with central
  finite differences of ``to_float64(model)`` in float64 (both the float64 and the float32
  derivative graphs); operators without a double kernel in onnxruntime are compared with
  the Jacobian of their definition, either the map applied to basis vectors (linear ops)
  or PyTorch autograd in float64.
* Modules exported by ``torch.onnx.export`` (TorchScript exporter at several opsets, and
  the dynamo exporter for the end-to-end networks) against ``torch.autograd.functional.jacobian``.
* Errors, activity analysis, float64 conversion, multiple inputs/outputs, dynamic batch.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from jacli.backends.onnx.derive import build_jvp, build_vjp
from jacli.backends.onnx.float64 import to_float64
from jacli.errors import InputError, UnsupportedError

from onnx_harness import (  # noqa: F401  (shared with the per-family rule tests)
    F32, I64, RNG, _session, as64, assert_close, distinct, fd_jacobian, jacobians, node_model,
)

# ------------------------------------------------- hand-built graphs vs float64 FD
def case(id, op, inputs, attrs=None, opset=17, wrt="x", of="y", outputs=("y",), feed=None):
    return pytest.param(op, inputs, attrs, opset, wrt, of, outputs, feed, id=id)


X = {"x": [2, 3, 4]}
positive = lambda shape: RNG.uniform(0.5, 2.0, shape).astype(np.float32)  # noqa: E731

FD_CASES = [
    *(case(op, op, X) for op in ["Neg", "Abs", "Exp", "Relu", "Sigmoid", "Tanh", "Sin", "Cos", "Identity"]),
    case("Sqrt", "Sqrt", X, feed=positive),
    case("Log", "Log", X, feed=positive),
    case("Reciprocal", "Reciprocal", X, feed=positive),
    case("Softmax-13-last", "Softmax", X, opset=13),
    case("Softmax-13-axis0", "Softmax", X, {"axis": 0}, opset=13),
    case("Softmax-11-flattens-from-axis1", "Softmax", X, opset=11),
    case("Softmax-11-axis0", "Softmax", X, {"axis": 0}, opset=11),
    case("LogSoftmax-13-axis1", "LogSoftmax", X, {"axis": 1}, opset=13),
    case("LogSoftmax-11-axis-2", "LogSoftmax", X, {"axis": -2}, opset=11),
    *(case(f"{op}-{side}", op, {"x": [2, 3, 4], "b": [3, 1]} if side == "big" else {"a": [2, 3, 4], "x": [3, 1]},
           feed=positive if op == "Pow" else None)
      for op in ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum"] for side in ["big", "small"]),
    case("Max-3-operands", "Max", {"a": [4], "x": [3, 4], "c": [1, 4]}),
    case("Pow-int-exponent", "Pow", {"x": [3, 4], "e": np.array(3, np.int64)}),
    case("Pow-exponent-wrt", "Pow", {"a": [3, 4], "x": [4]}, feed=positive),
    case("Where", "Where", {"c": np.array([[True], [False], [True]]), "x": [3, 4], "b": [4]}),
    case("Where-else-branch", "Where", {"c": np.array([True, False, True, False]), "a": [3, 4], "x": [3, 1]}),
    case("Clip-inputs", "Clip", {"x": [3, 4], "lo": F32(-0.4), "hi": F32(0.6)}, opset=13),
    case("Clip-min-only", "Clip", {"x": [3, 4], "lo": F32(-0.4)}, opset=13),
    case("MatMul-2d", "MatMul", {"x": [3, 4], "w": [4, 5]}),
    case("MatMul-batched-wrt-right", "MatMul", {"a": [2, 3, 4], "x": [2, 4, 5]}),
    case("MatMul-broadcast-left", "MatMul", {"x": [2, 1, 3, 4], "w": [3, 4, 2]}),
    case("MatMul-broadcast-right", "MatMul", {"a": [2, 1, 3, 4], "x": [3, 4, 2]}),
    case("MatMul-1d-left", "MatMul", {"x": [4], "w": [2, 4, 3]}),
    case("MatMul-1d-right", "MatMul", {"a": [2, 3, 4], "x": [4]}),
    case("MatMul-1d-1d", "MatMul", {"a": [4], "x": [4]}),
    *(case(f"Gemm-tA{ta}-tB{tb}-{w}", "Gemm",
           {"a": [4, 3] if ta else [3, 4], "b": [5, 4] if tb else [4, 5], "c": [5]},
           {"transA": ta, "transB": tb, "alpha": 0.7, "beta": 1.3}, wrt=w)
      for ta in (0, 1) for tb in (0, 1) for w in ("a", "b", "c")),
    case("Gemm-no-C", "Gemm", {"x": [3, 4], "b": [4, 2]}, opset=11),
    *(case(f"{op}-opset{opset}-keepdims{kd}", op,
           {"x": [2, 3, 4], "axes": I64(-1, 0)} if opset >= (13 if op == "ReduceSum" else 18) else X,
           {"keepdims": kd} if opset >= (13 if op == "ReduceSum" else 18) else {"keepdims": kd, "axes": [1]},
           opset=opset, feed=distinct)
      for op in ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1", "ReduceSumSquare",
                 "ReduceLogSumExp"]
      for opset in (11, 18) for kd in (0, 1)),
    case("ReduceSum-13-axes-input", "ReduceSum", {"x": [2, 3, 4], "axes": I64(1)}, {"keepdims": 0}, opset=13),
    case("ReduceMax-all-axes", "ReduceMax", X, {"keepdims": 0}, opset=18, feed=distinct),
    case("ReduceL2-noop-empty-axes", "ReduceL2", X, {"noop_with_empty_axes": 1}, opset=18),
    case("ReduceSumSquare-noop", "ReduceSumSquare", X, {"noop_with_empty_axes": 1}, opset=18),
    case("Slice-unit-steps", "Slice", {"x": [2, 3, 4], "s": I64(0, 1), "e": I64(2, 100), "a": I64(1, 2)}),
    case("Slice-negative-step", "Slice", {"x": [2, 3, 4], "s": I64(-1, 0), "e": I64(-100, 100), "a": I64(1, 2),
                                          "p": I64(-1, 2)}),
    case("Slice-negative-bounds", "Slice", {"x": [2, 3, 4], "s": I64(-3), "e": I64(-1), "a": I64(-1)}),
    case("Gather-axis1", "Gather", {"x": [2, 3, 4], "i": I64(2, 0)}, {"axis": 1}),
    case("Gather-scalar-index", "Gather", {"x": [2, 3, 4], "i": np.array(-1, np.int64)}, {"axis": 2}),
    case("Gather-repeated-indices", "Gather", {"x": [2, 3, 4], "i": I64(1, 1, -3)}, {"axis": 2}),
    case("GatherElements", "GatherElements", {"x": [2, 3], "i": np.array([[0, 2, 2], [1, 0, 1]], np.int64)},
         {"axis": 1}),
    case("GatherND", "GatherND", {"x": [2, 3, 4], "i": np.array([[0, 1], [1, 2], [0, 1]], np.int64)}),
    case("Pad-constant", "Pad", {"x": [2, 3, 4], "p": I64(0, 1, 2, 0, 2, 1), "v": F32(0.5)}, opset=13),
    case("Pad-negative", "Pad", {"x": [2, 3, 4], "p": I64(0, -1, 2, 0, 1, -1)}, opset=11),
    case("Pad-reflect", "Pad", {"x": [2, 3, 4], "p": I64(0, 1, 2, 0, 1, 1)}, {"mode": "reflect"}, opset=18),
    case("Pad-edge-axes", "Pad", {"x": [2, 3, 4], "p": I64(2, 1), "": None, "a": I64(-1)}, {"mode": "edge"},
         opset=18),
    case("Concat", "Concat", {"a": [2, 2, 4], "x": [2, 3, 4], "c": np.ones((2, 1, 4), np.float32)}, {"axis": -2}),
    case("Split-attr", "Split", X, {"axis": 2, "split": [1, 3]}, opset=11, outputs=("y", "z")),
    case("Split-attr-second", "Split", X, {"axis": 2, "split": [1, 3]}, opset=11, of="z", outputs=("y", "z")),
    case("Split-input", "Split", {"x": [2, 3, 4], "s": I64(2, 1)}, {"axis": 1}, opset=13, of="z",
         outputs=("y", "z")),
    case("Split-num-outputs", "Split", X, {"axis": 2, "num_outputs": 2}, opset=18, of="z", outputs=("y", "z")),
    case("Expand", "Expand", {"x": [3, 1], "s": I64(2, 3, 4)}),
    case("Tile", "Tile", {"x": [2, 3], "r": I64(2, 3)}),
    case("Transpose", "Transpose", X, {"perm": [2, 0, 1]}),
    case("Transpose-default-perm", "Transpose", X),
    case("Reshape", "Reshape", {"x": [2, 3, 4], "s": I64(0, -1)}),
    case("Flatten", "Flatten", X, {"axis": 2}),
    case("Squeeze-input", "Squeeze", {"x": [2, 1, 4], "a": I64(1)}, opset=13),
    case("Squeeze-attr", "Squeeze", {"x": [2, 1, 4]}, {"axes": [1]}, opset=11),
    case("Unsqueeze-input", "Unsqueeze", {"x": [2, 3], "a": I64(0, -1)}, opset=13),
    case("Unsqueeze-attr", "Unsqueeze", {"x": [2, 3]}, {"axes": [0, 3]}, opset=11),
    case("CumSum", "CumSum", {"x": [2, 3, 4], "a": np.array(1, np.int64)}),
    case("CumSum-reverse-exclusive", "CumSum", {"x": [2, 3, 4], "a": np.array(-1, np.int64)},
         {"reverse": 1, "exclusive": 1}),
    case("Cast-to-double", "Cast", X, {"to": TP.DOUBLE}),
    case("CastLike-to-double", "CastLike", {"x": [2, 3], "like": np.zeros(1, np.float64)}, opset=15),
    case("Dropout-inference", "Dropout", {"x": [2, 3, 4], "r": np.array(0.3, np.float32)}, opset=13),
    case("BatchNormalization", "BatchNormalization",
         {"x": [2, 3, 2, 2], "s": F32(0.5, 1.0, 2.0), "b": F32(0.1, 0.2, 0.3), "m": F32(0.0, 1.0, -1.0),
          "v": F32(1.0, 0.5, 2.0)}, {"epsilon": 1e-3}),
    case("LayerNormalization-last-axis", "LayerNormalization",
         {"x": [2, 3, 4], "s": RNG.uniform(0.5, 1.5, [4]).astype(np.float32), "b": F32(0, 1, 2, 3)}),
    case("LayerNormalization-axis1-wrt-scale", "LayerNormalization", {"a": [2, 3, 4], "x": [3, 4], "b": [4]},
         {"axis": 1}),
    case("LayerNormalization-wrt-bias", "LayerNormalization", {"a": [2, 3, 4], "s": [4], "x": [4]}),
]


@pytest.mark.parametrize("op, inputs, attrs, opset, wrt, of, outputs, feed", FD_CASES)
def test_rule_against_float64_finite_differences(op, inputs, attrs, opset, wrt, of, outputs, feed):
    model, feeds = node_model(op, inputs, attrs, opset, outputs,
                              out_type=TP.DOUBLE if op.startswith("Cast") else TP.FLOAT)
    if feed is not None:  # e.g. positive values for Log/Sqrt/Pow, distinct ones for pooling
        feeds = {k: feed(v.shape) for k, v in feeds.items()}
    if "axes" in inputs and isinstance(inputs["axes"], list):
        feeds["axes"] = np.array([1], np.int64)
        model.graph.input[1].type.tensor_type.elem_type = TP.INT64
    ints = {k: v for k, v in feeds.items() if v.dtype != np.float32}
    model64, feeds64 = to_float64(model), {**as64(feeds), **ints}
    expected = fd_jacobian(model64, feeds64, wrt, of)
    assert np.abs(expected).max() > 0  # the case exercises a non-trivial derivative
    for rows, cols in [jacobians(model64, feeds64, wrt, of)]:
        assert_close(rows, expected, 1e-6)
        assert_close(cols, expected, 1e-6)
    rows, cols = jacobians(model, feeds, wrt, of)
    assert_close(rows, expected, 1e-4)
    assert_close(cols, expected, 1e-4)


MAX_POOLS = [
    {"kernel_shape": [2, 2]},
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 0, 1, 1]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    {"kernel_shape": [2, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"kernel_shape": [3, 2], "auto_pad": "SAME_LOWER"},
    {"kernel_shape": [2, 2], "strides": [1, 2], "dilations": [2, 1]},
    {"kernel_shape": [3], "strides": [2]},
]


@pytest.mark.parametrize("attrs", MAX_POOLS, ids=[f"MaxPool-{i}" for i in range(len(MAX_POOLS))])
@pytest.mark.parametrize("opset, indices", [(12, False), (12, True), (17, False)])
def test_max_pool_against_float64_finite_differences(attrs, opset, indices):
    """Opset >= 16 or disjoint windows: scatter to MaxPool's Indices (any float type);
    overlapping windows before opset 16: masks + ConvTranspose (float32 only)."""
    shape = [2, 2, 7] if len(attrs["kernel_shape"]) == 1 else [1, 2, 6, 5]
    model, _ = node_model("MaxPool", {"x": shape}, attrs, opset, outputs=("y", "idx") if indices else ("y",))
    if indices:
        model.graph.output[1].type.tensor_type.elem_type = TP.INT64
    x = distinct(shape)  # no ties: the maximum of each window is unique
    model64, x64 = to_float64(model), {"x": x.astype(np.float64)}
    expected = fd_jacobian(model64, x64)
    rows, cols = jacobians(model, {"x": x})
    assert_close(rows, expected, 1e-5)
    assert_close(cols, expected, 1e-5)
    extents = [(k - 1) * d + 1 for k, d in zip(attrs["kernel_shape"], attrs.get("dilations", [1, 1]))]
    overlapping = any(s < e for s, e in zip(attrs.get("strides", [1, 1]), extents))
    if overlapping and opset < 16:
        with pytest.raises(UnsupportedError, match="no double-precision reverse rule"):
            build_vjp(model64, ["x"], ["y"])
    else:
        rows, cols = jacobians(model64, x64)
        assert_close(rows, expected, 1e-6)
        assert_close(cols, expected, 1e-6)


@pytest.mark.parametrize("opset", [12, 17])
def test_max_pool_ties_go_to_the_first_maximum_like_torch(opset):
    model, _ = node_model("MaxPool", {"x": [1, 1, 3, 4]}, {"kernel_shape": [2, 2], "strides": [1, 2]}, opset)
    x = np.array([[[[1, 3, 3, 0], [3, 2, 1, 3], [0, 3, 3, 3]]]], np.float32)
    rows, cols = jacobians(model, {"x": x})
    xt = torch.from_numpy(x)
    expected = torch.autograd.functional.jacobian(lambda v: F.max_pool2d(v, 2, (1, 2)), xt).reshape(4, 12)
    np.testing.assert_array_equal(rows, expected.numpy())
    np.testing.assert_array_equal(cols, expected.numpy())


# -------------------------------- float32-only ops: linear maps applied to basis vectors
LINEAR_CASES = [
    *(pytest.param("Conv", {"x": [1, 2, 7, 6], "w": RNG.standard_normal([3, 2, 2, 3]).astype(np.float32),
                            "b": F32(0.1, 0.2, 0.3)}, attrs, 17, id=f"Conv-{i}")
      for i, attrs in enumerate([
          {}, {"strides": [2, 2]}, {"pads": [1, 0, 2, 1]}, {"dilations": [2, 1]},
          {"strides": [2, 3], "pads": [1, 1, 1, 1]}, {"auto_pad": "SAME_UPPER"},
          {"auto_pad": "SAME_LOWER", "strides": [2, 2]}, {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
          {"auto_pad": "VALID", "strides": [2, 1]},
      ])),
    pytest.param("Conv", {"x": [1, 4, 6, 5], "w": RNG.standard_normal([6, 2, 3, 2]).astype(np.float32)},
                 {"group": 2, "strides": [2, 1], "pads": [1, 1, 0, 0]}, 11, id="Conv-groups"),
    pytest.param("Conv", {"x": [2, 2, 9], "w": RNG.standard_normal([3, 2, 3]).astype(np.float32)},
                 {"strides": [2], "pads": [1, 2], "dilations": [2]}, 13, id="Conv-1d"),
    # strided 1x1 kernels (ResNet shortcuts), grouped, padded, sizes not a multiple of the strides
    *(pytest.param("Conv", {"x": [1, 4, 7, 6], "w": RNG.standard_normal([6, 4 // attrs.get("group", 1), 1, 1])
                            .astype(np.float32)}, attrs, 17, id=f"Conv-1x1-{i}")
      for i, attrs in enumerate([
          {"strides": [2, 2]}, {"strides": [2, 3]}, {"strides": [3, 1], "group": 2}, {"strides": [2, 2], "group": 2},
          {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, {"strides": [2, 2], "pads": [0, 1, 1, 0]},
      ])),
    pytest.param("Conv", {"x": [2, 3, 9], "w": RNG.standard_normal([2, 3, 1]).astype(np.float32)},
                 {"strides": [4]}, 13, id="Conv-1x1-1d"),
    # strided depthwise and grouped kernels on a few output pixels (MobileNet's, EfficientNet's
    # last stages): zeros spread into the seeds, then the Conv with the adjoint kernel
    *(pytest.param("Conv", {"x": [1, 4, 7, 6], "w": RNG.standard_normal([4, 4 // group, *kernel]).astype(np.float32)},
                   {"group": group, **attrs}, 17, id=f"Conv-strided-grouped-{i}")
      for i, (group, kernel, attrs) in enumerate([
          (4, [3, 3], {"strides": [2, 2]}), (4, [3, 3], {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
          (4, [5, 5], {"strides": [2, 2], "pads": [2, 2, 2, 2]}), (4, [3, 2], {"strides": [2, 2], "pads": [2, 0, 0, 1]}),
          (4, [3, 3], {"strides": [2, 2], "auto_pad": "SAME_UPPER"}), (2, [3, 3], {"strides": [3, 3], "pads": [1, 1, 1, 1]}),
          (4, [3, 3], {"strides": [2, 2], "dilations": [2, 1], "pads": [1, 1, 0, 0]}),
      ])),
    *(pytest.param("ConvTranspose", {"x": [1, 2, 4, 3], "w": RNG.standard_normal([2, 3, 3, 2]).astype(np.float32),
                                     "b": F32(0.1, 0.2, 0.3)}, attrs, 17, id=f"ConvTranspose-{i}")
      for i, attrs in enumerate([
          {}, {"strides": [2, 2]}, {"strides": [2, 3], "pads": [1, 0, 0, 1]},
          {"strides": [3, 2], "output_padding": [1, 1]},
          {"strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [2, 1]},
          {"strides": [2, 2], "output_shape": [8, 5]},
          {"strides": [2, 2], "output_shape": [7, 5], "auto_pad": "SAME_UPPER"},
          {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, {"strides": [2, 2], "auto_pad": "SAME_LOWER"},
      ])),
    pytest.param("ConvTranspose", {"x": [1, 4, 3, 3], "w": RNG.standard_normal([4, 2, 2, 3]).astype(np.float32)},
                 {"group": 2, "strides": [2, 1]}, 11, id="ConvTranspose-groups"),
    *(pytest.param("AveragePool", {"x": [1, 2, 7, 6]}, attrs, 19, id=f"AveragePool-{i}")
      for i, attrs in enumerate([
          {"kernel_shape": [2, 2]}, {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 0, 1, 1]},
          {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
          {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
          {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
          {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1,
           "ceil_mode": 1},
          {"kernel_shape": [2, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
          {"kernel_shape": [3, 2], "auto_pad": "SAME_LOWER", "count_include_pad": 1},
          {"kernel_shape": [2, 2], "strides": [1, 2], "dilations": [2, 1]},
      ])),
    pytest.param("GlobalAveragePool", {"x": [2, 3, 4, 5]}, {}, 17, id="GlobalAveragePool"),
]


def _basis_jacobian(model, feeds):
    """J of an affine map, column j = f(e_j) - f(0), evaluated by onnxruntime itself."""
    s, x = _session(model), feeds["x"]
    zero = s.run(["y"], {"x": np.zeros_like(x)})[0]
    return np.array([(s.run(["y"], {"x": e.reshape(x.shape)})[0] - zero).ravel()
                     for e in np.eye(x.size, dtype=np.float32)]).T


@pytest.mark.parametrize("op, inputs, attrs, opset", LINEAR_CASES)
@pytest.mark.parametrize("batch", ["static", "dynamic"])
def test_linear_window_ops_against_basis_images(op, inputs, attrs, opset, batch):
    model, feeds = node_model(op, inputs, attrs, opset)
    if batch == "dynamic":  # batch and spatial sizes only known at run time
        for i, d in enumerate(model.graph.input[0].type.tensor_type.shape.dim):
            d.dim_param = f"d{i}"
    expected = _basis_jacobian(model, feeds)
    rows, cols = jacobians(model, feeds)
    assert_close(rows, expected, 1e-5)
    assert_close(cols, expected, 1e-5)


@pytest.mark.parametrize("op, inputs, attrs, opset", [c for c in LINEAR_CASES if "strided-grouped" in c.id])
def test_strided_grouped_conv_adjoints_on_few_pixels_are_convs(op, inputs, attrs, opset):
    """Their input gradients (checked above) are no ConvTranspose when the sizes are static;
    on more output pixels than SPREAD_FIRST they are."""
    from jacli.backends.onnx import derive
    from jacli.backends.onnx.rules import conv

    model, _ = node_model(op, inputs, attrs, opset)
    ops = [n.op_type for n in derive.build_vjp(model, ["x"], ["y"]).graph.node]
    assert "ConvTranspose" not in ops and ops.count("Conv") == 1 and "Pad" in ops
    wide, _ = node_model(op, {**inputs, "x": [1, 4, 13, 11]}, attrs, opset)  # 7 x 6 output pixels or more
    assert conv.SPREAD_FIRST < 7 * 6
    assert "ConvTranspose" in [n.op_type for n in derive.build_vjp(wide, ["x"], ["y"]).graph.node]


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMax", "ReduceL2"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduction_axes_known_only_at_run_time(op, keepdims):
    model, _ = node_model(op, {"x": [2, 3, 4], "axes": [1]}, {"keepdims": keepdims}, 18)
    model.graph.input[1].type.tensor_type.elem_type = TP.INT64
    feeds = {"x": distinct([2, 3, 4]).astype(np.float64), "axes": np.array([-2], np.int64)}
    expected = fd_jacobian(to_float64(model), feeds)
    # shape inference cannot shape y, so ct:y / jvp:y cannot declare the shape the checker wants
    rows, cols = jacobians(to_float64(model), feeds, check=False)
    assert_close(rows, expected, 1e-6)
    assert_close(cols, expected, 1e-6)


def test_float64_conversion_refuses_ops_without_double_kernel():
    model, _ = node_model("Conv", {"x": [1, 1, 3, 3], "w": np.ones((1, 1, 2, 2), np.float32)})
    with pytest.raises(UnsupportedError, match=r"'Conv' \(node 'conv_node'\)"):
        to_float64(model)


# ---------------------- float32-only nonlinear ops vs PyTorch autograd of their definition
TORCH_DEFINED = [
    ("LeakyRelu", {"alpha": 0.2}, 17, lambda x: F.leaky_relu(x, 0.2)),
    ("Elu", {"alpha": 0.7}, 17, lambda x: F.elu(x, 0.7)),
    ("Selu", {}, 17, F.selu),
    ("Selu", {"alpha": 1.5, "gamma": 0.5}, 17, lambda x: 0.5 * torch.where(x > 0, x, 1.5 * (torch.exp(x) - 1))),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, 17, lambda x: torch.clamp(0.3 * x + 0.4, 0, 1)),
    ("HardSwish", {}, 17, F.hardswish),
    ("Softplus", {}, 17, F.softplus),
    ("Softsign", {}, 17, F.softsign),
    ("Erf", {}, 17, torch.erf),
    ("Gelu", {}, 20, F.gelu),
    ("Gelu", {"approximate": "tanh"}, 20, lambda x: F.gelu(x, approximate="tanh")),
    ("LRN", {"size": 3, "alpha": 0.1, "beta": 0.75, "bias": 2.0}, 17,
     lambda x: F.local_response_norm(x, 3, alpha=0.1, beta=0.75, k=2.0)),
    ("LRN", {"size": 5}, 13, lambda x: F.local_response_norm(x, 5)),
    ("GlobalMaxPool", {}, 17, lambda x: torch.amax(x, dim=(2, 3), keepdim=True)),
    ("Clip", {"min": -0.4, "max": 0.6}, 6, lambda x: torch.clamp(x, -0.4, 0.6)),  # attribute form
]


@pytest.mark.parametrize("op, attrs, opset, reference", TORCH_DEFINED, ids=[f"{c[0]}-{i}" for i, c in
                                                                             enumerate(TORCH_DEFINED)])
def test_float32_only_ops_against_torch_definition(op, attrs, opset, reference):
    model, feeds = node_model(op, {"x": [2, 5, 2, 3]}, attrs, opset)
    feeds["x"] = distinct([2, 5, 2, 3], -3.0, 3.0)
    x64 = torch.from_numpy(feeds["x"].astype(np.float64))
    expected = torch.autograd.functional.jacobian(reference, x64).reshape(-1, x64.numel()).numpy()
    rows, cols = jacobians(model, feeds)
    assert_close(rows, expected, 1e-4)
    assert_close(cols, expected, 1e-4)


@pytest.mark.parametrize("op, reference", [
    ("PRelu", lambda a, s: torch.where(a > 0, a, s * a)),  # slope broadcast per channel
    ("Mean", lambda a, s: (a + s) / 2),
])
@pytest.mark.parametrize("wrt", ["x", "s"])
def test_two_input_float32_ops_against_torch_definition(op, reference, wrt):
    shape = [2, 3, 2, 2]
    model, _ = node_model(op, {"x": shape, "s": [3, 1, 1]})
    feeds = {"x": distinct(shape), "s": distinct([3, 1, 1], 0.1, 0.9)}
    a, s = (torch.from_numpy(feeds[k].astype(np.float64)) for k in ("x", "s"))
    if wrt == "x":
        expected = torch.autograd.functional.jacobian(lambda v: reference(v, s), a)
    else:
        expected = torch.autograd.functional.jacobian(lambda v: reference(a, v), s)
    rows, cols = jacobians(model, feeds, x=wrt)
    assert_close(rows, expected.reshape(rows.shape).numpy(), 1e-4)
    assert_close(cols, expected.reshape(rows.shape).numpy(), 1e-4)


def test_instance_normalization_against_torch_definition():
    scale, bias = F32(0.5, 1.0, 2.0), F32(0.1, 0.0, -0.1)
    model, _ = node_model("InstanceNormalization", {"x": [2, 3, 2, 2], "s": scale, "b": bias}, {"epsilon": 1e-3})
    x = distinct([2, 3, 2, 2])
    expected = torch.autograd.functional.jacobian(
        lambda v: F.instance_norm(v, weight=torch.from_numpy(scale).double(), bias=torch.from_numpy(bias).double(),
                                  eps=1e-3), torch.from_numpy(x.astype(np.float64))).reshape(x.size, x.size)
    rows, cols = jacobians(model, {"x": x})
    assert_close(rows, expected.numpy(), 1e-4)
    assert_close(cols, expected.numpy(), 1e-4)


# ------------------------------------------------------------ torch.onnx.export modules
class Fn(nn.Module):
    """A module from a function of (self, x), with optional parameters."""

    def __init__(self, fn, **params):
        super().__init__()
        self.fn = fn
        for name, value in params.items():
            setattr(self, name, nn.Parameter(torch.as_tensor(value, dtype=torch.float32)))

    def forward(self, x):
        return self.fn(self, x)


def export(module, example, dynamo=False, opset=17):
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(module, (example,), dynamo=True, verbose=False, opset_version=opset,
                                        input_names=["x"], output_names=["y"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        return onnx.load_from_string(buffer.getvalue())


def torch_jacobian(module, x: np.ndarray) -> np.ndarray:
    """d module(x) / dx by PyTorch autograd in float64 (vectorised, forward mode when the
    output is the larger side)."""
    m64 = module.double()
    x64 = torch.from_numpy(x.astype(np.float64))
    with torch.no_grad():
        size = m64(x64).numel()
    strategy = "forward-mode" if size > x64.numel() else "reverse-mode"
    j = torch.autograd.functional.jacobian(m64, x64, vectorize=True, strategy=strategy)
    module.float()
    return j.detach().reshape(size, x64.numel()).numpy()


def _randomize_batchnorm(module):
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return module


torch.manual_seed(0)
TORCH_MODULES = [
    ("conv-stride-pad", nn.Conv2d(2, 4, 3, stride=2, padding=1), [2, 2, 6, 5], 13),
    ("conv-dilation-groups", nn.Conv2d(4, 4, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2),
     [1, 4, 5, 6], 11),
    ("conv-same", nn.Conv2d(2, 3, (3, 4), padding="same", bias=False), [1, 2, 5, 5], 17),
    ("conv1d", nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2), [2, 2, 9], 17),
    ("convtranspose-output-padding", nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
     [2, 2, 3, 3], 13),
    ("convtranspose-groups-dilation", nn.ConvTranspose2d(4, 4, (2, 3), stride=(2, 1), padding=(0, 1), groups=2,
                                                         dilation=(1, 2)), [1, 4, 3, 3], 17),
    ("convtranspose1d", nn.ConvTranspose1d(2, 2, 4, stride=3), [2, 2, 4], 11),
    ("maxpool-pad", nn.MaxPool2d(3, stride=2, padding=1), [2, 2, 5, 6], 13),
    ("maxpool-ceil", nn.MaxPool2d(2, ceil_mode=True), [1, 2, 5, 5], 17),
    ("maxpool-dilation", nn.MaxPool2d(2, stride=1, dilation=2), [1, 2, 5, 5], 11),
    ("avgpool-exclude-pad", nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), [1, 2, 6, 5], 13),
    ("avgpool-ceil-include-pad", nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True), [1, 2, 6, 6], 17),
    ("avgpool1d", nn.AvgPool1d(2), [2, 3, 6], 11),
    ("adaptive-avg-pool", nn.AdaptiveAvgPool2d(1), [2, 3, 3, 4], 13),
    ("adaptive-max-pool", nn.AdaptiveMaxPool2d(1), [2, 3, 3, 4], 13),
    ("batchnorm1d", _randomize_batchnorm(nn.BatchNorm1d(5)), [3, 5], 13),
    ("instancenorm", nn.InstanceNorm2d(3, affine=True), [2, 3, 3, 3], 13),
    ("groupnorm", nn.GroupNorm(2, 4), [2, 4, 2, 3], 17),
    ("layernorm-2d", nn.LayerNorm([3, 4]), [2, 3, 4], 17),
    ("layernorm-opset11", nn.LayerNorm(4), [2, 3, 4], 11),
    ("activations-1", nn.Sequential(nn.LeakyReLU(0.2), nn.ELU(0.7), nn.SELU(), nn.Softplus(), nn.Softsign()),
     [2, 6], 13),
    ("activations-2", nn.Sequential(nn.Hardsigmoid(), nn.Linear(6, 6), nn.Hardswish(), nn.Linear(6, 6), nn.Mish(),
                                    nn.SiLU(), nn.ReLU6()), [2, 6], 17),
    ("gelu-erf", nn.GELU(), [2, 6], 17),
    ("gelu-opset20", nn.Sequential(nn.GELU(), nn.Linear(6, 6), nn.GELU(approximate="tanh")), [2, 6], 20),
    ("prelu-hardtanh", nn.Sequential(nn.PReLU(3, 0.3), nn.Hardtanh(-0.5, 0.8)), [2, 3, 4], 13),
    ("softmax-dim1-opset11", nn.Softmax(dim=1), [2, 3, 4], 11),
    ("logsoftmax-opset11", nn.LogSoftmax(dim=-1), [2, 3, 4], 11),
    ("softmax-dim0-opset13", Fn(lambda s, x: torch.softmax(x, 0) * x), [2, 3, 4], 13),
    ("shape-ops", Fn(lambda s, x: torch.cat([x.flatten(1)[:, ::2], x.permute(0, 2, 1).reshape(x.shape[0], -1)],
                                            1).unsqueeze(1).squeeze(1)), [2, 3, 4], 13),
    ("chunk-index-flip", Fn(lambda s, x: x.chunk(2, dim=2)[1] * x[:, :, 1:3] + x[:, -1:, :2].flip(1)
                            + x[..., 0:1]), [2, 3, 4], 13),
    ("split-opset11", Fn(lambda s, x: torch.split(x, [1, 3], dim=-1)[1].sum(-1)), [2, 3, 4], 11),
    ("gather-index-select", Fn(lambda s, x: x.index_select(2, torch.tensor([3, 0, 3])) + x[:, 1:2, 2:3]),
     [2, 3, 4], 17),
    ("pad-constant-reflect-replicate", Fn(lambda s, x: F.pad(x, (1, 2, 0, 1), value=0.5)[..., :3, :4]
                                          + F.pad(x, (1, 1, 1, 1), mode="reflect")[..., :3, :4]
                                          + F.pad(x, (2, 0, 0, 1), mode="replicate")[..., :3, :4]), [1, 2, 3, 4], 17),
    ("expand-repeat", Fn(lambda s, x: x[:, :1].expand(-1, 3, -1) * x.repeat(1, 1, 2)[..., 2:6]), [2, 3, 4], 13),
    ("reductions", Fn(lambda s, x: torch.cat([x.sum(1), x.mean((1, 2), keepdim=True)[:, 0], x.amax(-1),
                                              x.norm(dim=1), torch.logsumexp(x, 2)], 1)), [2, 3, 4], 13),
    ("reductions-opset18", Fn(lambda s, x: torch.cat([x.sum(1), x.mean((1, 2), keepdim=True)[:, 0], x.amax(-1),
                                                      x.amin(1), x.norm(dim=1)], 1)), [2, 3, 4], 18),
    ("elementwise", Fn(lambda s, x: torch.where(x > 0, x, 0.5 * x ** 2) + torch.clamp(x, min=-0.5)
                       + torch.sqrt(x.abs() + 1) * torch.exp(-x) + torch.log(x * x + 1) + 1 / (x * x + 2)
                       + torch.erf(x) - torch.maximum(x, s.w) + torch.minimum(x, -x) + x.cumsum(1),
                       w=np.linspace(-1, 1, 4)), [2, 3, 4], 13),
    ("matmul-broadcast-1d", Fn(lambda s, x: (x @ s.w).transpose(1, 2) @ x + (x.sum(-1) @ s.v).unsqueeze(1)
                               + (x @ s.u)[..., None] + (s.u @ x.transpose(1, 2))[..., None],
                               w=np.random.default_rng(0).standard_normal([4, 3]),
                               v=np.random.default_rng(1).standard_normal([3, 4]), u=np.linspace(-1, 1, 4)),
     [2, 3, 4], 13),
    ("pow-div-sub", Fn(lambda s, x: (x.abs() + 1) ** s.p / (x - 3) - s.p ** x.tanh(), p=[1.5, 2.0, 0.5, 3.0]),
     [2, 3, 4], 13),
]


@pytest.mark.parametrize("module, shape, opset", [pytest.param(*m[1:], id=m[0]) for m in TORCH_MODULES])
def test_torchscript_exported_modules_match_torch_autograd(module, shape, opset):
    x = distinct(shape)
    model = export(module, torch.from_numpy(x), opset=opset)
    expected = torch_jacobian(module, x)
    rows, cols = jacobians(model, {"x": x})
    assert_close(rows, expected, 1e-4)
    assert_close(cols, expected, 1e-4)


# ------------------------------------------------------------------ end-to-end networks
class Residual(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class Attention(nn.Module):
    """Pre-norm transformer block with hand-written multi-head attention."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.out((a @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.ff(self.ln2(x))


def _networks():
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Softmax(-1)), [2, 6]),
        # BatchNorm after ReLU: exporters cannot fold it into the convolution
        "cnn": (_randomize_batchnorm(nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, stride=2), nn.AvgPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(4, 3))),
            [2, 2, 8, 8]),
        "residual": (_randomize_batchnorm(Residual()), [2, 4, 4, 4]),
        "attention": (Attention(), [2, 3, 8]),
        "encoder-layer": (nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), [2, 3, 8]),
    }


class _Together(nn.Module):
    """All networks side by side (one dynamo export instead of five slow ones)."""

    def __init__(self, nets):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x0, x1, x2, x3, x4):
        return tuple(net(x) for net, x in zip(self.nets, (x0, x1, x2, x3, x4)))


@pytest.fixture(scope="module")
def networks():
    nets = _networks()
    for net, _ in nets.values():
        net.eval()
    inputs = {name: distinct(shape) for name, (_, shape) in nets.items()}
    return nets, inputs


@pytest.fixture(scope="module")
def dynamo_networks(networks, tmp_path_factory):
    """The dynamo exporter's model of all networks (inputs x_<name>, outputs y_<name>)."""
    nets, inputs = networks
    names = list(nets)
    together = _Together([nets[n][0] for n in names]).eval()
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            together, tuple(torch.from_numpy(inputs[n]) for n in names), dynamo=True, verbose=False,
            input_names=[f"x_{n}" for n in names], output_names=[f"y_{n}" for n in names],
            dynamic_shapes=tuple({0: batch} for _ in names))
    path = tmp_path_factory.mktemp("dynamo") / "networks.onnx"
    program.save(str(path))
    return onnx.load(str(path))


@pytest.mark.parametrize("name", ["mlp", "cnn", "residual", "attention"])
def test_torchscript_exported_networks_match_torch(networks, name):
    nets, inputs = networks
    net, x = nets[name][0], inputs[name]
    model = export(net, torch.from_numpy(x), opset=17)
    if name == "cnn":
        assert "BatchNormalization" in {n.op_type for n in model.graph.node}
    expected = torch_jacobian(net, x)
    rows, cols = jacobians(model, {"x": x})
    assert_close(rows, expected, 1e-4)
    assert_close(cols, expected, 1e-4)


@pytest.mark.parametrize("name", ["mlp", "cnn", "residual", "attention", "encoder-layer"])
def test_dynamo_exported_networks_match_torch(networks, dynamo_networks, name):
    nets, inputs = networks
    feeds = {f"x_{n}": v for n, v in inputs.items()}
    expected = torch_jacobian(nets[name][0], inputs[name])
    rows, cols = jacobians(dynamo_networks, feeds, f"x_{name}", f"y_{name}")
    assert_close(rows, expected, 1e-4)
    assert_close(cols, expected, 1e-4)


def test_tf2onnx_style_network_matches_torch():
    """The patterns tf2onnx emits for a Keras CNN: NHWC input transposed around Conv and
    MaxPool with auto_pad SAME_UPPER, a constant Reshape, MatMul + Add, Softmax (opset 13),
    and a batch dim named unk__N."""
    rng = np.random.default_rng(7)
    w1, b1 = rng.standard_normal([4, 2, 3, 3]).astype(np.float32) / 3, F32(0.1, -0.2, 0.3, 0.0)
    w2, b2 = rng.standard_normal([36, 5]).astype(np.float32) / 6, F32(0.0, 0.1, 0.2, 0.3, 0.4)
    nodes = [
        oh.make_node("Transpose", ["input_1"], ["nchw"], perm=[0, 3, 1, 2]),
        oh.make_node("Conv", ["nchw", "w1", "b1"], ["conv"], auto_pad="SAME_UPPER", strides=[2, 2],
                     kernel_shape=[3, 3]),
        oh.make_node("Relu", ["conv"], ["relu"]),
        oh.make_node("MaxPool", ["relu"], ["pool"], auto_pad="SAME_UPPER", kernel_shape=[2, 2], strides=[1, 1]),
        oh.make_node("Transpose", ["pool"], ["nhwc"], perm=[0, 2, 3, 1]),
        oh.make_node("Reshape", ["nhwc", "shape"], ["flat"]),
        oh.make_node("MatMul", ["flat", "w2"], ["logits0"]),
        oh.make_node("Add", ["logits0", "b2"], ["logits"]),
        oh.make_node("Softmax", ["logits"], ["dense"], axis=-1),
    ]
    inits = [nh.from_array(w1, "w1"), nh.from_array(b1, "b1"), nh.from_array(w2, "w2"), nh.from_array(b2, "b2"),
             nh.from_array(I64(-1, 36), "shape")]
    model = _graph(nodes, [("input_1", ["unk__5", 6, 6, 2])], [("dense", ["unk__5", 5])], inits, opset=13)

    def reference(x):  # SAME_UPPER: total pad 1 (stride-2 conv of 6, stride-1 pool of 3), all at the end
        h = F.conv2d(F.pad(x.permute(0, 3, 1, 2), (0, 1, 0, 1)), torch.from_numpy(w1).double(),
                     torch.from_numpy(b1).double(), stride=2).relu()
        h = F.max_pool2d(F.pad(h, (0, 1, 0, 1), value=-np.inf), 2, 1).permute(0, 2, 3, 1).reshape(-1, 36)
        return torch.softmax(h @ torch.from_numpy(w2).double() + torch.from_numpy(b2).double(), -1)

    x = distinct([2, 6, 6, 2])
    expected = torch.autograd.functional.jacobian(reference, torch.from_numpy(x.astype(np.float64)))
    rows, cols = jacobians(model, {"input_1": x}, "input_1", "dense")
    assert_close(rows, expected.reshape(rows.shape).numpy(), 1e-4)
    assert_close(cols, expected.reshape(rows.shape).numpy(), 1e-4)


def test_dynamic_batch_is_kept_and_folded_blocks_give_per_sample_jacobians(networks):
    """k one-hot cotangents folded into the batch axis: one run gives k Jacobian rows of
    every sample (the caller's scheme), at a batch size other than the exported one."""
    nets, inputs = networks
    net = nets["mlp"][0]
    model = export(net, torch.from_numpy(inputs["mlp"]))
    vjp = build_vjp(model, ["x"], ["y"])
    assert vjp.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = distinct([5, 6])
    k = 3  # rows per block; y has 3 elements per sample
    xs = np.tile(x, (k, 1))
    cts = np.repeat(np.eye(k, dtype=np.float32), len(x), axis=0)
    (grads,) = _session(vjp).run(None, {"x": xs, "ct:y": cts})
    per_sample = grads.reshape(k, len(x), 6).transpose(1, 0, 2)
    expected = torch.func.vmap(torch.func.jacrev(net))(torch.from_numpy(x)).detach().numpy()
    assert_close(per_sample, expected, 1e-4)


# ------------------------------------------------------------------ graph-level behaviour
def _graph(nodes, inputs, outputs, inits=(), opset=17):
    vi = lambda name, shape, t=TP.FLOAT: oh.make_tensor_value_info(name, t, shape)  # noqa: E731
    graph = oh.make_graph(nodes, "g", [vi(*i) for i in inputs], [vi(*o) for o in outputs], initializer=list(inits))
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])


def test_operator_without_rule_names_op_and_node():
    model = _graph([oh.make_node("Relu", ["x"], ["h"], name="act"),
                    oh.make_node("DFT", ["h"], ["y"], name="dft_3")],
                   [("x", [2, 3, 1])], [("y", [2, 3, 2])])
    for build in (build_vjp, build_jvp):
        with pytest.raises(UnsupportedError, match=r"operator 'DFT' \(node 'dft_3'\) has no derivative rule.*"
                                                   r"--method fd"):
            build(model, ["x"], ["y"])


def test_integer_output_op_without_rule_is_not_silently_zero():
    """NonMaxSuppression has int64 outputs, but it is not declared non-differentiable."""
    boxes = np.array([[[0, 0, 1, 1], [0, 0, 1, 1.1], [2, 2, 3, 3]]], np.float32)
    model = _graph([oh.make_node("Mul", ["x", "b"], ["boxes"]),
                    oh.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel"], name="nms_3"),
                    oh.make_node("Cast", ["sel"], ["y"], to=TP.FLOAT)],
                   [("x", [1, 3, 4])], [("y", None)],
                   [nh.from_array(boxes, "b"), nh.from_array(np.array([[[0.9, 0.8, 0.7]]], np.float32), "scores")])
    with pytest.raises(UnsupportedError, match=r"operator 'NonMaxSuppression' \(node 'nms_3'\)"):
        build_vjp(model, ["x"], ["y"])


def test_derivative_wrt_unsupported_input_slot_is_refused():
    model = _graph([oh.make_node("Dropout", ["x", "r"], ["y"], name="drop")],
                   [("x", [1, 1, 3, 3]), ("r", [])], [("y", None)], opset=13)
    with pytest.raises(UnsupportedError, match=r"'Dropout' \(node 'drop'\).*input 1 \('r'\)"):
        build_jvp(model, ["r"], ["y"])
    model = _graph([oh.make_node("Dropout", ["x", "r", "t"], ["y"], name="drop")],
                   [("x", [2, 3])], [("y", None)], [nh.from_array(F32(0.5), "r"),
                                                    nh.from_array(np.array(True), "t")], opset=13)
    with pytest.raises(UnsupportedError, match="training mode"):
        build_vjp(model, ["x"], ["y"])


def test_non_differentiable_ops_and_independent_subgraphs_are_forward_computation():
    """ArgMax/Shape/comparisons of the input give integer data and Floor is piecewise
    constant (zero derivative); a branch on constants only (even with an op without a
    rule, TopK) is kept as it is."""
    w = RNG.standard_normal([5]).astype(np.float32)
    nodes = [
        oh.make_node("TopK", ["w", "k"], ["top", "top_i"], name="const_branch"),
        oh.make_node("ReduceSum", ["top"], ["c"], keepdims=1),
        oh.make_node("ArgMax", ["x"], ["am"], axis=1),
        oh.make_node("GatherElements", ["x", "am"], ["picked"], axis=1),  # row maxima
        oh.make_node("Shape", ["x"], ["shape"]),
        oh.make_node("Greater", ["x", "c"], ["pos"]),
        oh.make_node("Where", ["pos", "x", "c"], ["w1"]),
        oh.make_node("Reshape", ["w1", "shape"], ["w2"]),
        oh.make_node("Floor", ["x"], ["steps"]),  # piecewise constant
        oh.make_node("Mul", ["w2", "picked"], ["w3"]),
        oh.make_node("Mul", ["w3", "steps"], ["y"]),
    ]
    model = _graph(nodes, [("x", [2, 5])], [("y", None)], [nh.from_array(w, "w"), nh.from_array(I64(2), "k")])
    x = distinct([2, 5]) + np.float32(0.1)  # away from the integers where Floor jumps
    model64, x64 = to_float64(model), x.astype(np.float64)
    expected = fd_jacobian(model64, {"x": x64})
    rows, cols = jacobians(model, {"x": x})
    assert_close(rows, expected, 1e-4)
    assert_close(cols, expected, 1e-4)
    vjp = build_vjp(model, ["x"], ["y"])
    topk = [n for n in vjp.graph.node if n.op_type == "TopK"]
    assert topk == [nodes[0]]  # kept verbatim, no derivative node built from it
    assert not any(n.name.startswith("vjp/const_branch") for n in vjp.graph.node)


def test_outputs_independent_of_the_input_have_zero_derivative():
    model = _graph([oh.make_node("Relu", ["x"], ["y"]), oh.make_node("Neg", ["z"], ["u"])],
                   [("x", [2, 3]), ("z", [2, 3])], [("y", [2, 3]), ("u", [2, 3])])
    feeds = {"x": distinct([2, 3]), "z": distinct([2, 3])}
    (g,) = _session(build_vjp(model, ["x"], ["u"])).run(None, {**feeds, "ct:u": np.ones([2, 3], np.float32)})
    (t,) = _session(build_jvp(model, ["x"], ["u"])).run(None, {**feeds, "tan:x": np.ones([2, 3], np.float32)})
    assert g.shape == t.shape == (2, 3) and not g.any() and not t.any()


def test_several_inputs_and_outputs():
    """y = x1 * x2, u = tanh(x1) + y: cotangents of both outputs sum, tangents of both inputs add."""
    model = _graph([oh.make_node("Mul", ["x1", "x2"], ["y"]), oh.make_node("Tanh", ["x1"], ["t"]),
                    oh.make_node("Add", ["t", "y"], ["u"])],
                   [("x1", ["n", 3]), ("x2", [1, 3])], [("y", ["n", 3]), ("u", ["n", 3])])
    x1, x2 = distinct([2, 3]), distinct([1, 3])
    cy, cu = distinct([2, 3]), distinct([2, 3])
    t1, t2 = distinct([2, 3]), distinct([1, 3])
    vjp = build_vjp(model, ["x1", "x2"], ["y", "u"])
    onnx.checker.check_model(vjp, full_check=True)
    assert [i.name for i in vjp.graph.input] == ["x1", "x2", "ct:y", "ct:u"]
    assert [o.name for o in vjp.graph.output] == ["grad:x1", "grad:x2"]
    g1, g2 = _session(vjp).run(None, {"x1": x1, "x2": x2, "ct:y": cy, "ct:u": cu})
    sech2 = 1 - np.tanh(x1) ** 2
    assert_close(g1, (cy + cu) * x2 + cu * sech2, 1e-6)
    assert_close(g2, ((cy + cu) * x1).sum(0, keepdims=True), 1e-6)
    jvp = build_jvp(model, ["x1", "x2"], ["y", "u"])
    onnx.checker.check_model(jvp, full_check=True)
    ty, tu = _session(jvp).run(None, {"x1": x1, "x2": x2, "tan:x1": t1, "tan:x2": t2})
    assert_close(ty, t1 * x2 + x1 * t2, 1e-6)
    assert_close(tu, sech2 * t1 + t1 * x2 + x1 * t2, 1e-6)


@pytest.mark.parametrize("opset", [11, 13])
def test_broadcasting_decided_at_run_time(opset):
    """Operand dims that may or may not be 1 (different symbols): the sum-reduction back to
    the operand's shape is computed at run time (ReduceSum with axes input, opset >= 13)."""
    model = _graph([oh.make_node("Mul", ["x", "b"], ["y"], name="mul")],
                   [("x", ["n", 3]), ("b", ["m", 3])], [("y", [None, 3])], opset=opset)
    if opset < 13:
        with pytest.raises(UnsupportedError, match=r"'Mul' \(node 'mul'\).*run-time broadcasting"):
            build_vjp(model, ["b"], ["y"])
        return
    for m in (1, 2):  # b broadcast along axis 0, or not
        feeds = {"x": distinct([2, 3]), "b": distinct([m, 3])}
        expected = fd_jacobian(to_float64(model), as64(feeds), "b")
        rows, cols = jacobians(model, feeds, "b")
        assert_close(rows, expected, 1e-5)
        assert_close(cols, expected, 1e-5)


def test_unknown_names_and_integer_tensors_are_input_errors():
    model = _graph([oh.make_node("Relu", ["x"], ["y"])], [("x", [2])], [("y", [2])])
    with pytest.raises(InputError, match="'nope' is not an input"):
        build_vjp(model, ["nope"], ["y"])
    with pytest.raises(InputError, match="'nope' is not an output"):
        build_jvp(model, ["x"], ["nope"])
    model = _graph([oh.make_node("Cast", ["x"], ["y"], to=TP.INT64)], [("x", [2])], [("y", [2], TP.INT64)])
    with pytest.raises(InputError, match="not a floating-point tensor"):
        build_vjp(model, ["x"], ["y"])


def test_old_opset_model_is_converted():
    model = _graph([oh.make_node("Unsqueeze", ["x"], ["u"], axes=[0]), oh.make_node("Softmax", ["u"], ["y"])],
                   [("x", [2, 3])], [("y", [1, 2, 3])], opset=9)
    x = distinct([2, 3])
    expected = fd_jacobian(to_float64(model), {"x": x.astype(np.float64)})
    rows, cols = jacobians(model, {"x": x})
    assert_close(rows, expected, 1e-4)
    assert_close(cols, expected, 1e-4)


def test_to_float64_computes_the_same_function_in_double():
    model = _graph([oh.make_node("Constant", [], ["c"], value_float=0.1),
                    oh.make_node("Mul", ["x", "c"], ["h"]),
                    oh.make_node("Cast", ["h"], ["h16"], to=TP.FLOAT16),
                    oh.make_node("Cast", ["h16"], ["h32"], to=TP.FLOAT),
                    oh.make_node("MatMul", ["h32", "w"], ["y"])],
                   [("x", ["n", 3])], [("y", ["n", 2])], [nh.from_array(distinct([3, 2]), "w")])
    m64 = to_float64(model)
    onnx.checker.check_model(m64, full_check=True)
    assert m64.graph.input[0].type.tensor_type.elem_type == TP.DOUBLE
    assert m64.graph.output[0].type.tensor_type.elem_type == TP.DOUBLE
    x = distinct([4, 3]).astype(np.float64) / 3
    (y64,) = _session(m64).run(None, {"x": x})
    w = nh.to_array(model.graph.initializer[0]).astype(np.float64)
    assert y64.dtype == np.float64
    np.testing.assert_allclose(y64, (x * float(np.float32(0.1))) @ w, rtol=1e-12)  # no float16/32 rounding


def test_model_local_functions_are_inlined_and_need_no_trust(tmp_path):
    """A model-local function (as exporters emit) is plain ONNX: jacli loads it without
    --trust-model and differentiates through it, matching float64 FD (CLI in a fresh process,
    where only what jacli imports is loaded)."""
    import subprocess
    import sys

    body = [oh.make_node("Mul", ["a", "a"], ["sq"]), oh.make_node("Tanh", ["sq"], ["b"])]
    fn = oh.make_function("local.fns", "SquareTanh", ["a"], ["b"], body, [oh.make_opsetid("", 17)])
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("SquareTanh", ["h"], ["y"], domain="local.fns")],
                          "local", [oh.make_tensor_value_info("x", TP.FLOAT, ["n", 3])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["n", 2])], [nh.from_array(distinct([3, 2]) / 2, "w")])
    model = oh.make_model(graph, functions=[fn], opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("local.fns", 1)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "local.onnx")
    x = distinct([2, 3]) / 2
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, "-m", "jacli", "compute", "local.onnx", "x.npy", "-o", "J.npy", "-q"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    J = np.load(tmp_path / "J.npy")
    w = nh.to_array(model.graph.initializer[0]).astype(np.float64)
    h = x.astype(np.float64) @ w  # y = tanh(h²): dy_j/dx_i = (1 - tanh²(h_j²)) · 2 h_j · w_ij
    expected = ((1 - np.tanh(h**2) ** 2) * 2 * h)[:, :, None] * w.T[None]
    np.testing.assert_allclose(J, expected, rtol=1e-5, atol=1e-6)
