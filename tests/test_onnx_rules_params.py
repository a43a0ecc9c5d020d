"""Derivatives with respect to inputs that are usually parameters, when a model has them as
graph inputs: Conv/ConvTranspose weights, normalisation scale/bias/statistics, Clip bounds,
the Pad value; each in both modes against float64 finite differences and the adjoint
identity, over the attribute combinations that change the geometry."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper as oh

from onnx_cases import case_model, check_model  # noqa: E402

RNG = np.random.default_rng(5)


def _r(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


CONV = [
    dict(),
    dict(strides=[2, 1], pads=[1, 0, 0, 2], dilations=[1, 2]),
    dict(group=2, auto_pad="SAME_UPPER"),
    dict(group=4, strides=[2, 2], auto_pad="SAME_LOWER"),
]


@pytest.mark.parametrize("attrs", CONV, ids=range(len(CONV)))
def test_conv_weight_and_bias(attrs):
    groups = attrs.get("group", 1)
    x, w, bias = _r(2, 4, 6, 5), _r(4, 4 // groups, 3, 2), _r(4)
    model, feeds = case_model(oh.make_node("Conv", ["x", "w", "b"], ["y"], **attrs), [x, w, bias], 17)
    check_model(model, feeds)  # w.r.t. x, w and b together


@pytest.mark.parametrize("attrs", [dict(), dict(strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 0]),
                                   dict(group=2, strides=[2, 1], dilations=[1, 2])], ids=range(3))
def test_conv_transpose_weight(attrs):
    groups = attrs.get("group", 1)
    x, w = _r(2, 4, 3, 4), _r(4, 6 // groups, 3, 2)
    model, feeds = case_model(oh.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs), [x, w], 17)
    check_model(model, feeds)


def test_batch_and_instance_norm_parameters():
    x = _r(2, 3, 4, 2)
    stats = [_r(3), _r(3), _r(3), np.abs(_r(3)) + 0.5]
    model, feeds = case_model(oh.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3),
                              [x, *stats], 15)
    check_model(model, feeds)
    model, feeds = case_model(oh.make_node("InstanceNormalization", ["x", "s", "b"], ["y"]), [x, _r(3), _r(3)], 17)
    check_model(model, feeds)


def test_clip_bounds_and_pad_value():
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4) + 0.01
    model, feeds = case_model(oh.make_node("Clip", ["x", "lo", "hi"], ["y"]),
                              [x, np.float32(-0.7), np.float32(1.1)], 13)
    check_model(model, feeds)
    model, feeds = case_model(oh.make_node("Pad", ["x", "pads", "v"], ["y"]),
                              [x, np.array([1, 0, 0, 2], np.int64), np.float32(0.3)], 13)
    check_model(model, feeds)


def test_parameter_without_rule_names_the_wrt_that_works(tmp_path):
    from jacli.backends.onnx.derive import build_vjp
    from jacli.errors import UnsupportedError

    model, _ = case_model(oh.make_node("LRN", ["x"], ["h"], size=3, name="lrn"), [_r(1, 4, 2, 2)], 17)
    node = oh.make_node("Dropout", ["h", "ratio"], ["y"], name="drop")
    model.graph.node.append(node)
    model.graph.input.append(oh.make_tensor_value_info("ratio", 1, []))
    model.graph.output[0].name = "y"
    with pytest.raises(UnsupportedError, match=r"'Dropout' \(node 'drop'\).*input 1 \('ratio'\); differentiate "
                                               r"with respect to the other inputs only with --wrt x"):
        build_vjp(model, ["x", "ratio"], ["y"])


@pytest.mark.parametrize("attrs", [dict(strides=[2, 1], pads=[1, 0, 0, 2], dilations=[1, 2]), dict(group=2)],
                         ids=["strided", "grouped"])
def test_conv_weight_gradient_matches_torch_float64(attrs):
    import torch
    from onnx_cases import session

    from jacli.backends.onnx.derive import build_jvp, build_vjp

    groups = attrs.get("group", 1)
    x, w = _r(2, 4, 6, 5), _r(4, 4 // groups, 3, 2)
    model, feeds = case_model(oh.make_node("Conv", ["x", "w"], ["y"], **attrs), [x, w], 17)
    y = session(model).run(None, feeds)[0]
    c, t = _r(*y.shape), _r(*w.shape)
    (grad,) = session(build_vjp(model, ["w"], ["y"])).run(None, {**feeds, "ct:y": c})
    (tan,) = session(build_jvp(model, ["w"], ["y"])).run(None, {**feeds, "tan:w": t})
    pads = attrs.get("pads", [0, 0, 0, 0])
    xt = torch.nn.functional.pad(torch.tensor(x, dtype=torch.float64), (pads[1], pads[3], pads[0], pads[2]))
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    conv = lambda v: torch.nn.functional.conv2d(xt, v, stride=attrs.get("strides", 1),  # noqa: E731
                                                dilation=attrs.get("dilations", 1), groups=groups)
    out = conv(wt)
    (ref_grad,) = torch.autograd.grad(out, wt, torch.tensor(c, dtype=torch.float64))
    _, ref_tan = torch.func.jvp(conv, (wt.detach(),), (torch.tensor(t, dtype=torch.float64),))
    np.testing.assert_allclose(grad, ref_grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tan, ref_tan.numpy(), rtol=1e-4, atol=1e-4)
