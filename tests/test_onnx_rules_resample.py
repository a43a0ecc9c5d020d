"""Derivative rules of the resampling operators (rules/resample.py): Resize and Upsample (every
mode, coordinate transformation, nearest mode, cubic coefficient, exclude_outside, antialias,
scales or sizes, axes), GridSample, DepthToSpace, SpaceToDepth and CenterCropPad, on the
attribute sets and inputs of onnx's own node tests, against float64 finite differences of
onnx.reference (onnxruntime has no double Resize), VJP and JVP, plus the adjoint identity."""
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

from jacli.backends.onnx.derive import build_vjp
from jacli.errors import UnsupportedError
from onnx_harness import RNG, _session, assert_close, jacobians, node_model
from onnx_rules_check import as_rule_case, basis_images, check_rule, node_tests

OPS = [("resize", "Resize"), ("upsample", "Upsample"), ("gridsample", "GridSample"),
       ("depthtospace", "DepthToSpace"), ("spacetodepth", "SpaceToDepth"), ("center_crop_pad", "CenterCropPad")]
REFUSED = {"not_larger", "not_smaller"}  # keep_aspect_ratio_policy: refused by name


def _cases(refused: bool):
    for module, op in OPS:
        for name, model, inputs in node_tests(module, op):
            if any(word in name for word in REFUSED) == refused:
                yield pytest.param(model, inputs, id=name)


@pytest.mark.parametrize("model, inputs", list(_cases(refused=False)))
def test_resampling_rule_on_onnx_node_test(model, inputs):
    case, feeds = as_rule_case(model, inputs, x_values=lambda v: RNG.standard_normal(v.shape))
    check_rule(case, feeds, linear=True)


@pytest.mark.parametrize("model, inputs", list(_cases(refused=True)))
def test_resize_keep_aspect_ratio_policy_is_refused_by_name(model, inputs):
    case, _ = as_rule_case(model, inputs)
    with pytest.raises(UnsupportedError, match="keep_aspect_ratio_policy='not_"):
        build_vjp(case, ["x"], ["y"])


# ------------------------------------------- Resize: modes x coordinate transformations x opsets
COORDINATES = ["half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
               "tf_crop_and_resize"]
ROI = np.array([0, 0, 0.2, 0.1, 1, 1, 0.9, 1.2], np.float32)  # crops, and extrapolates past 1


def _resize_case(attrs, opset=19, scales=(1, 1, 1.5, 0.6), sizes=None, shape=(1, 2, 3, 5)):
    """A Resize of x (shape) with constant scales or sizes (and the ROI for tf_crop_and_resize)."""
    crop = attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize"
    inits = {"roi": ROI[: 2 * len(shape)] if len(shape) == 4 else None, "scales": np.array(scales, np.float32),
             "sizes": None if sizes is None else np.array(sizes, np.int64)}
    inits["roi"] = inits["roi"] if crop else None
    if sizes is not None:
        inits["scales"] = None
    names = []
    for name in ["roi", "scales", "sizes"]:
        if inits[name] is None and (opset < 13 and name != "sizes"):
            inits[name] = np.zeros(0, np.float32)  # required inputs before opset 13
        names.append(name if inits[name] is not None else "")
    node = oh.make_node("Resize", ["x", *names], ["y"], **attrs)
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info("x", TP.FLOAT, list(shape))],
                          [oh.make_tensor_value_info("y", TP.FLOAT, None)],
                          initializer=[nh.from_array(v, k) for k, v in inits.items() if v is not None])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    return model, {"x": RNG.standard_normal(shape).astype(np.float32)}


RESIZE_TABLE = [
    *({"mode": m, "coordinate_transformation_mode": c} for c in COORDINATES for m in ["nearest", "linear", "cubic"]),
    *({"mode": "nearest", "coordinate_transformation_mode": c, "nearest_mode": nm}
      for c in ["asymmetric", "align_corners", "half_pixel"] for nm in ["floor", "ceil", "round_prefer_ceil"]),
    {"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1},
    {"mode": "cubic", "cubic_coeff_a": -0.5, "coordinate_transformation_mode": "tf_crop_and_resize",
     "extrapolation_value": 2.5},
    {"mode": "linear", "antialias": 1},
    {"mode": "cubic", "antialias": 1, "coordinate_transformation_mode": "pytorch_half_pixel"},
]


@pytest.mark.parametrize("attrs", RESIZE_TABLE, ids=lambda a: "-".join(str(v) for v in a.values()))
def test_resize_modes_and_coordinate_transformations(attrs):
    model, feeds = _resize_case(attrs)
    check_rule(model, feeds, linear=True)


@pytest.mark.parametrize("opset", [11, 13, 18])
@pytest.mark.parametrize("how", ["scales", "sizes"])
@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
def test_resize_at_older_opsets(opset, how, mode):
    attrs = {"mode": mode, "coordinate_transformation_mode": "align_corners" if mode == "cubic" else "asymmetric"}
    model, feeds = _resize_case(attrs, opset, sizes=(1, 2, 5, 3) if how == "sizes" else None)
    check_rule(model, feeds, linear=True)


def test_resize_3d_5d_and_nhwc_inputs():
    for shape, scales in [((2, 3, 4), (1, 1, 1.75)), ((1, 1, 2, 3, 2), (1, 1, 2, 0.7, 1.5)),
                          ((1, 3, 5, 2), (1, 1.5, 0.6, 1))]:  # tf2onnx's NHWC resizes: axes 1 and 2
        model, feeds = _resize_case({"mode": "linear"}, scales=scales, shape=shape)
        check_rule(model, feeds, linear=True)
        model, feeds = _resize_case({"mode": "nearest"}, scales=scales, shape=shape)
        check_rule(model, feeds, linear=True)


@pytest.mark.parametrize("how", ["scales", "sizes-at-run-time"])
def test_resize_with_dynamic_batch_and_spatial_axes(how):
    """Batch and spatial sizes known only at run time, sizes computed from Shape (as exporters
    write F.interpolate(size=...)): the interpolation matrices are built at run time."""
    x = oh.make_tensor_value_info("x", TP.FLOAT, ["N", 2, "H", "W"])
    y = oh.make_tensor_value_info("y", TP.FLOAT, None)
    if how == "scales":
        nodes = [oh.make_node("Resize", ["x", "", "s"], ["y"], mode="linear")]
        inits = [nh.from_array(np.array([1, 1, 2, 1.5], np.float32), "s")]
    else:  # sizes = Shape(x) * (1, 1, 2, 1) + (0, 0, 0, 1)
        nodes = [oh.make_node("Shape", ["x"], ["shape"]), oh.make_node("Mul", ["shape", "k"], ["scaled"]),
                 oh.make_node("Add", ["scaled", "o"], ["sizes"]),
                 oh.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic")]
        inits = [nh.from_array(np.array([1, 1, 2, 1], np.int64), "k"),
                 nh.from_array(np.array([0, 0, 0, 1], np.int64), "o")]
    model = oh.make_model(oh.make_graph(nodes, "g", [x], [y], initializer=inits),
                          opset_imports=[oh.make_opsetid("", 19)])
    feeds = {"x": RNG.standard_normal((2, 2, 3, 2)).astype(np.float32)}
    check_rule(model, feeds, linear=True)


@pytest.mark.parametrize("op, opset, scales", [("Upsample", 9, (1, 1, 2, 1.5)), ("Resize", 10, (1, 1, 2, 1.5)),
                                               ("Resize", 10, (1, 1, 0.5, 0.7))])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_upsample_and_resize10_of_old_opset_models(op, opset, scales, mode):
    """Converted to opset 11 (which onnx's converter does with half_pixel coordinates for
    linear modes: jacli keeps them asymmetric); the derivative is of the original model."""
    model, feeds = node_model(op, {"x": [1, 2, 4, 5], "s": np.array(scales, np.float32)}, {"mode": mode},
                              opset=opset)
    check_rule(model, feeds, linear=True)


def test_grid_sample_with_dynamic_batch():
    model, feeds = node_model("GridSample", {"x": [2, 3, 3, 4], "grid": RNG.uniform(-1.1, 1.1, (2, 2, 5, 2))
                              .astype(np.float32)}, {"mode": "cubic", "padding_mode": "reflection"}, opset=20)
    model.graph.input[0].CopyFrom(oh.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 3, 4]))
    check_rule(model, feeds, linear=True)


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align_corners", [0, 1])
@pytest.mark.parametrize("opset, mode", [(16, "bilinear"), (20, "linear"), (20, "nearest"), (20, "cubic")])
def test_grid_sample_wrt_grid(padding, align_corners, opset, mode):
    """Against torch autograd of F.grid_sample in float64 (the same definition; onnx.reference's
    slopes w.r.t. the grid are off), VJP and JVP, plus the adjoint identity; the grid reaches
    past the border and stays off the integer pixel positions, where the slope jumps."""
    rng = np.random.default_rng(7)  # fixed: with zeros padding most points must fall inside
    x = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
    model, _ = node_model("GridSample", {"i": x, "x": [2, 3, 2, 2]},
                          {"mode": mode, "padding_mode": padding, "align_corners": align_corners}, opset=opset)
    reach = 2.6 if padding == "reflection" else 1.3  # reflection folds twice
    grid = rng.uniform(-reach, reach, (2, 3, 2, 2))
    size = np.array([4, 3])  # pixels along grid x, y
    pixels = (grid + 1) * (size - 1) / 2 if align_corners else ((grid + 1) * size - 1) / 2
    pixels = np.where(np.abs(pixels - np.round(pixels)) < 0.1, pixels + 0.25, pixels)
    grid = (2 * pixels / (size - 1) - 1) if align_corners else ((2 * pixels + 1) / size - 1)
    feeds = {"x": grid.astype(np.float32)}
    if mode == "cubic" and padding != "zeros":  # cubic taps are clamped/reflected one by one
        with pytest.raises(UnsupportedError, match="cubic: zeros padding only"):
            build_vjp(model, ["x"], ["y"])
        return
    g64, x64 = torch.from_numpy(feeds["x"].astype(np.float64)), torch.from_numpy(x.astype(np.float64))
    torch_mode = {"nearest": "nearest", "cubic": "bicubic"}.get(mode, "bilinear")
    sample = lambda g: F.grid_sample(x64, g, torch_mode, padding, bool(align_corners))  # noqa: E731
    np.testing.assert_allclose(_session(model).run(["y"], feeds)[0], sample(g64).numpy(), atol=1e-5)  # same function
    expected = torch.autograd.functional.jacobian(sample, g64).reshape(24, 24).numpy()
    check_rule(model, feeds, expected=expected, reference=False, nonzero=mode != "nearest")


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_grid_sample_wrt_grid_volumetric(padding):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 2, 3, 2, 4)).astype(np.float32)
    model, _ = node_model("GridSample", {"i": x, "x": [1, 2, 2, 2, 3]},
                          {"mode": "linear", "padding_mode": padding, "align_corners": 0}, opset=20)
    size = np.array([4, 2, 3])  # pixels along grid x, y, z
    pixels = ((rng.uniform(-1.2, 1.2, (1, 2, 2, 2, 3)) + 1) * size - 1) / 2
    pixels = np.where(np.abs(pixels - np.round(pixels)) < 0.1, pixels + 0.25, pixels)
    feeds = {"x": ((2 * pixels + 1) / size - 1).astype(np.float32)}
    g64, x64 = torch.from_numpy(feeds["x"].astype(np.float64)), torch.from_numpy(x.astype(np.float64))
    sample = lambda g: F.grid_sample(x64, g, "bilinear", padding, False)  # noqa: E731
    np.testing.assert_allclose(_session(model).run(["y"], feeds)[0], sample(g64).numpy(), atol=1e-5)
    expected = torch.autograd.functional.jacobian(sample, g64).reshape(16, 24).numpy()
    check_rule(model, feeds, expected=expected, reference=False)


# -------------------------------------------- end to end: a U-Net-style decoder from torch.onnx
class _Decoder(nn.Module):
    """Encoder conv, pooled bottleneck, nearest x2 (nn.Upsample), skip concat, bilinear x2
    (F.interpolate) and a bilinear x2 with align_corners, given by its size or (``sized``
    False) its scale. At opset 11 the exporter's run-time sizes, or a dynamic batch, leave
    the resized shapes unknown to shape inference, and the sum of the two resizes then needs
    run-time broadcasting, which needs opset 13."""

    def __init__(self, sized=True):
        super().__init__()
        self.sized = sized
        self.enc, self.mid = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.up, self.fuse = nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        e = torch.tanh(self.enc(x))
        m = torch.tanh(self.mid(F.max_pool2d(e, 2)))
        f = torch.tanh(self.fuse(torch.cat([self.up(m), e], 1)))
        out = F.interpolate(f, scale_factor=2.0, mode="bilinear", align_corners=False)
        size = dict(size=(12, 12)) if self.sized else dict(scale_factor=2.0)
        out = out + F.interpolate(f, **size, mode="bilinear", align_corners=True)
        return self.head(out)


def _export(module, example, opset, dynamo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(module, (example,), dynamo=True, verbose=False, opset_version=opset,
                                     input_names=["x"], output_names=["y"]).model_proto
        buffer = io.BytesIO()  # at opset 11, shape inference needs the batch size (see _Decoder)
        dynamic = {"x": {0: "batch"}, "y": {0: "batch"}} if opset > 11 else None
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["y"], dynamic_axes=dynamic)
        return onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    net = _Decoder().eval()
    x = RNG.standard_normal((1, 2, 6, 6)).astype(np.float32)
    net64 = _Decoder().double().eval()
    net64.load_state_dict(net.state_dict())
    x64 = torch.from_numpy(x.astype(np.float64))
    expected = torch.autograd.functional.jacobian(net64, x64, vectorize=True).reshape(144, 72).numpy()
    return net, x, expected


@pytest.mark.parametrize("opset, dynamo", [(11, False), (13, False), (17, False), (18, True)])
def test_unet_decoder_exported_by_torch_matches_torch_autograd(decoder, opset, dynamo):
    net, x, expected = decoder
    net.sized = opset > 11
    model = _export(net, torch.from_numpy(x), opset, dynamo)
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    modes = {oh.get_attribute_value(a) for n in resizes for a in n.attribute if a.name == "mode"}
    assert len(resizes) == 3 and modes == {b"nearest", b"linear"}
    rows, cols = jacobians(model, {"x": x})
    assert_close(rows, expected, 1e-4)
    assert_close(cols, expected, 1e-4)


# ------------------------------- end to end: a spatial transformer (AffineGrid + GridSample)
class _SpatialTransformer(nn.Module):
    """theta from the image, the image resampled on its grid: GridSample w.r.t. X and grid."""

    def __init__(self):
        super().__init__()
        self.loc = nn.Linear(2 * 4 * 5, 6)
        with torch.no_grad():
            self.loc.weight.mul_(0.1)
            self.loc.bias.copy_(torch.tensor([0.9, 0.1, 0.05, -0.1, 1.1, 0.02]))

    def forward(self, x):
        theta = self.loc(x.flatten(1)).view(-1, 2, 3)
        grid = F.affine_grid(theta, [x.shape[0], 2, 3, 4], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_spatial_transformer_exported_by_torch_matches_torch_autograd():
    torch.manual_seed(0)
    net = _SpatialTransformer().eval()
    x = RNG.standard_normal((2, 2, 4, 5)).astype(np.float32)
    model = _export(net, torch.from_numpy(x), 20, False)
    assert {"AffineGrid", "GridSample"} <= {n.op_type for n in model.graph.node}
    net64 = _SpatialTransformer().double()
    net64.load_state_dict(net.state_dict())
    expected = torch.autograd.functional.jacobian(net64, torch.from_numpy(x.astype(np.float64)))
    rows, cols = jacobians(model, {"x": x})
    assert_close(rows, expected.reshape(rows.shape).numpy(), 1e-4)
    assert_close(cols, expected.reshape(rows.shape).numpy(), 1e-4)


@pytest.mark.parametrize("align_corners", [0, 1])
@pytest.mark.parametrize("size", [[2, 1, 3, 4], [1, 1, 2, 3, 2]])
def test_affine_grid(align_corners, size):
    k = len(size) - 2
    model, feeds = node_model("AffineGrid", {"x": [size[0], k, k + 1], "s": np.array(size, np.int64)},
                              {"align_corners": align_corners}, opset=20)
    # linear in theta: onnxruntime's images of the basis thetas (onnx.reference computes in float32)
    check_rule(model, feeds, linear=True, expected=basis_images(model, feeds), reference=False)
