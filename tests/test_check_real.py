"""`jacli check` on real architectures (tests/corpus_torch.py, tests/corpus_onnx.py) in every
format that holds them: no false alarms at the default settings, the AD Jacobians right
against float64 torch.func references, reverse-only models checkable, and real bugs still
caught (a misplaced detach(), a wrong custom autograd.Function, a wrong ONNX derivative
rule, a gradient 1% off on a few entries). Also the float64 evaluation of ONNX graphs
onnxruntime has no double kernels for (jacli/backends/onnx/float64.py) against torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import corpus_onnx
import corpus_torch as corpus
import jacli
from jacli.backends.onnx import float64 as f64
from jacli.errors import UnsupportedError

TS_EVERY_ENTRY = tuple(corpus.ARCHS)  # TorchScript trace: every entry of every architecture
ONNX_EVERY_ENTRY = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "vit", "bert", "gpt2", "conv1d")


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """name -> (module, x, reference Jacobian, {format: path})."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("corpus")
    cache = {}

    def get(name, formats=("trace", "onnx")):
        if name not in cache:
            module, x = corpus.build(name)
            cache[name] = [module, x, corpus.reference_jacobian(module, x), {}]
        entry = cache[name]
        missing = [f for f in formats if f not in entry[3]]
        if missing:
            paths, failed = corpus.save_all(entry[0], entry[1], root / name, formats=missing)
            assert not failed, failed
            entry[3].update(paths)
        return entry

    return get


def _assert_passes(result, what):
    doc = result.to_json()
    assert doc["passed"], (what, doc["failures"], doc["mismatches"][:3], doc["adjoint_failures"][:3], doc["notes"])
    assert doc["checked"] > 0
    return doc


@pytest.mark.parametrize("name", TS_EVERY_ENTRY)
def test_torchscript_every_entry(built, name):
    module, x, ref, paths = built(name, ("trace",))
    model = jacli.load(str(paths["trace"]), trust=True)
    doc = _assert_passes(jacli.check(model, x.numpy()), name)
    assert doc["kind"] == "columns" and doc["checked"] == ref.size
    np.testing.assert_allclose(jacli.jacobian(model, x.numpy(), mode="reverse"), ref, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("name", ONNX_EVERY_ENTRY)
def test_onnx_every_entry_in_float64(built, name):
    """onnxruntime has no double Conv/Erf/...: FD still runs in float64 (the evaluator)."""
    module, x, ref, paths = built(name, ("onnx",))
    model = jacli.load(str(paths["onnx"]))
    doc = _assert_passes(jacli.check(model, x.numpy()), name)
    assert doc["fd_dtype"] == "float64", doc["notes"]
    assert doc["kinks"] == 0 and doc["fd_noise"] == 0
    np.testing.assert_allclose(jacli.jacobian(model, x.numpy()), ref, atol=2e-5 * np.abs(ref).max())


# --- float64 evaluation of ONNX graphs without double kernels ---------------------------
def _one_node(op, x, inits=(), **attrs):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names = [f"w{i}" for i in range(len(inits))]
    node = helper.make_node(op, ["x", *names], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(w, np.float32), n) for w, n in zip(inits, names)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return f64.Evaluator(model).run(["y"], {"x": x.astype(np.float64)})[0]


CONVS = [  # (C, O, kernel, attrs): torch's conv2d (float64) is the reference
    (4, 6, (3, 3), dict(pads=[1, 1, 1, 1])),
    (4, 6, (3, 2), dict(strides=[2, 1], pads=[0, 1, 2, 0])),
    (4, 4, (3, 3), dict(group=4, dilations=[2, 2], pads=[2, 2, 2, 2])),
    (4, 6, (5, 5), dict(group=2, strides=[2, 2], auto_pad="SAME_UPPER")),
    (4, 6, (1, 1), dict()),
]


@pytest.mark.parametrize("c,o,k,attrs", CONVS)
def test_float64_conv_matches_torch(c, o, k, attrs):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, c, 9, 8))
    g = attrs.get("group", 1)
    w, b = rng.standard_normal((o, c // g, *k)).astype(np.float32), rng.standard_normal(o).astype(np.float32)
    y = _one_node("Conv", x.astype(np.float32), (w, b), kernel_shape=list(k), **attrs)
    xt = torch.from_numpy(x.astype(np.float32).astype(np.float64))
    pads = attrs.get("pads", [0] * 4)
    if attrs.get("auto_pad") == "SAME_UPPER":  # 5x5 stride 2 on 9x8: total pads 4 and 3, the extra one at the end
        pads = [2, 1, 2, 2]
    xt = torch.nn.functional.pad(xt, (pads[1], pads[3], pads[0], pads[2]))
    ref = torch.nn.functional.conv2d(xt, torch.from_numpy(w).double(), torch.from_numpy(b).double(),
                                     stride=attrs.get("strides", 1), dilation=attrs.get("dilations", 1), groups=g)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)),
    ("AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)),
])
def test_float64_pooling_matches_torch(op, attrs):
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 9))
    y = _one_node(op, x, **attrs)
    xt = torch.from_numpy(x)
    pad = attrs.get("pads", [0])[0]
    if op == "MaxPool":
        ref = torch.nn.functional.max_pool2d(xt, 3, 2, pad, ceil_mode=bool(attrs.get("ceil_mode")))
    else:
        ref = torch.nn.functional.avg_pool2d(xt, attrs["kernel_shape"][0], 2, pad, ceil_mode=bool(attrs.get("ceil_mode")),
                                             count_include_pad=bool(attrs.get("count_include_pad")))
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-13, atol=1e-13)


def test_float64_lrn_erf_batchnorm_follow_the_spec():
    """LRN sums squares over channels (onnx.reference sums over the batch axis); Erf is not
    rounded to float32; opset-9 BatchNormalization uses the running statistics."""
    from scipy.special import erf

    x = np.random.default_rng(2).standard_normal((2, 7, 3, 3))
    y = _one_node("LRN", x, size=5, alpha=2.0 ** -7, beta=0.75, bias=2.0)  # float32-exact attributes
    ref = torch.nn.functional.local_response_norm(torch.from_numpy(x), 5, alpha=2.0 ** -7, beta=0.75, k=2.0).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-13)
    np.testing.assert_allclose(_one_node("Erf", x), erf(x), rtol=1e-15)
    scale, bias, mean, var = (np.linspace(0.5, 1.5, 7), np.linspace(-1, 1, 7), np.linspace(-0.2, 0.3, 7), np.linspace(0.5, 2, 7))
    y = _one_node("BatchNormalization", x, (scale, bias, mean, var))
    s = lambda v: np.asarray(v, np.float32).astype(np.float64).reshape(-1, 1, 1)  # noqa: E731
    np.testing.assert_allclose(y, s(scale) * (x - s(mean)) / np.sqrt(s(var) + float(np.float32(1e-5))) + s(bias), rtol=1e-13)


# --- the ONNX project's CNN architectures --------------------------------------------------
@pytest.mark.parametrize("name", ["shufflenet", "squeezenet"])
def test_onnx_zoo_architectures_pass_at_224(tmp_path, name):
    """Random He-scaled weights, no final Softmax, 224x224: the float64 evaluation agrees
    with onnxruntime's float32 and --directions 1 passes."""
    path = corpus_onnx.save(name, tmp_path)
    model = jacli.load(str(path))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    doc = _assert_passes(jacli.check(model, x, directions=1), name)
    assert doc["fd_dtype"] == "float64", doc["notes"]
