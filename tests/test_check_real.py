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
from jacli.backends import torch_once
from jacli.backends.onnx import float64 as f64
from conftest import run_jacli
from jacli.errors import UnsupportedError

TS_EVERY_ENTRY = tuple(corpus.ARCHS)  # TorchScript trace: every entry of every architecture
# the nets with GELU or SiLU, whose derivatives jacli's torch backends take once per forward pass (torch_once)
ONCE = {"efficientnet_b0", "vit", "gpt2", "bert", "conv1d"}
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


@pytest.fixture
def run():
    return lambda *args: run_jacli(*map(str, args))


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
    # frozen on first use: weights are constants, and a batch norm after a convolution is folded into it
    # (torchscript._frozen; DenseNet's come before theirs)
    assert not list(model.module.parameters())
    assert ("aten::batch_norm" in str(model.module.inlined_graph)) == (name == "densenet121")
    assert doc["kind"] == "columns" and doc["checked"] == ref.size
    np.testing.assert_allclose(jacli.jacobian(model, x.numpy(), mode="reverse"), ref, atol=2e-5 * np.abs(ref).max())
    assert (model._rewritten is not None) == (name in ONCE), name


@pytest.mark.parametrize("name", ONNX_EVERY_ENTRY)
def test_onnx_every_entry_in_float64(built, name):
    """onnxruntime has no double Conv/Erf/...: FD still runs in float64 (the evaluator)."""
    module, x, ref, paths = built(name, ("onnx",))
    model = jacli.load(str(paths["onnx"]))
    doc = _assert_passes(jacli.check(model, x.numpy()), name)
    assert doc["fd_dtype"] == "float64", doc["notes"]
    assert doc["kinks"] == 0 and doc["fd_noise"] == 0
    np.testing.assert_allclose(jacli.jacobian(model, x.numpy()), ref, atol=2e-5 * np.abs(ref).max())


OTHER_FORMATS = [(n, f) for f in ("script", "pt2", "onnx-dynamo") for n in corpus.ARCHS
                 if not (f == "onnx-dynamo" and n in ("lstm", "gru"))]


@pytest.mark.parametrize("name,fmt", OTHER_FORMATS)
def test_other_formats_pass(built, name, fmt):
    """TorchScript script and .pt2 by --directions 3 (forward mode, or reverse where torch
    has none), dynamo-exported ONNX every entry."""
    module, x, ref, paths = built(name, (fmt,))
    model = jacli.load(str(paths[fmt]), trust=True)
    doc = _assert_passes(jacli.check(model, x.numpy(), directions=None if fmt.startswith("onnx") else 3), (name, fmt))
    assert doc["fd_dtype"] == "float64", doc["notes"]
    np.testing.assert_allclose(jacli.jacobian(model, x.numpy()), ref, atol=2e-5 * np.abs(ref).max())
    if fmt == "script":
        assert (model._rewritten is not None) == (name in ONCE), name
    if fmt == "pt2":
        rewritten = any(torch_once.ORIGINAL in n.meta for n in model.module.graph.nodes)
        assert rewritten == (name in ONCE), name
    if fmt == "pt2":  # batch norms after a convolution folded into it (torch_export._fold_batch_norms)
        left = [n for n in model.module.graph.nodes if "batch_norm" in str(n.target)]
        assert bool(left) == (name == "densenet121"), left  # DenseNet's first norm of a layer follows a concat


@pytest.mark.parametrize("name", ["lstm", "gru"])
@pytest.mark.parametrize("fmt", ["onnx", "onnx-dynamo"])
def test_recurrent_onnx(built, name, fmt):
    """onnxruntime has no double LSTM/GRU: --method fd differences in float64 all the same
    (through the unrolled recurrence), the exact Jacobian matches float64 autograd, and check
    passes, for both exporters."""
    module, x, ref, paths = built(name, (fmt,))
    model = jacli.load(str(paths[fmt]))
    np.testing.assert_allclose(jacli.jacobian(model, x.numpy(), method="fd"), ref, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(jacli.jacobian(model, x.numpy()), ref, atol=2e-5 * np.abs(ref).max())
    doc = _assert_passes(jacli.check(model, x.numpy()), (name, fmt))
    assert doc["fd_dtype"] == "float64"


# --- float64 evaluation of ONNX graphs without double kernels ---------------------------
def _one_node(op, x, inits=(), **attrs):
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


# --- reverse-only models (no forward mode: torch's CPU flash attention) ----------------------
@pytest.fixture(scope="session")
def gpt2_paths(tmp_path_factory):
    """A GPT-2 block (dim 16) whose SDPA runs torch's CPU flash kernel, which has no
    forward-mode rule; and the same with an LM head (more outputs than inputs, so that
    --mode auto would pick forward mode)."""
    module, x = corpus.GPT2(seq=8, dim=16, depth=1, heads=2), torch.randn(2, 4, 16)
    corpus.randomize(module)
    head = corpus.randomize(torch.nn.Sequential(module, torch.nn.Linear(16, 40)))
    root = tmp_path_factory.mktemp("gpt2")
    paths, failed = corpus.save_all(module, x, root, formats=("trace", "pt2"))
    headed, failed2 = corpus.save_all(head, x, root, formats=("trace",), name="lm")
    assert not failed and not failed2
    return module, head, x, paths, headed["trace"]


@pytest.mark.parametrize("fmt", ["trace", "pt2"])
def test_reverse_only_model_is_checkable(gpt2_paths, fmt):
    module, _, x, paths, _ = gpt2_paths
    model = jacli.load(str(paths[fmt]), trust=True)
    with pytest.raises(UnsupportedError, match="in forward mode.*mode='reverse'"):
        jacli.check(model, x.numpy(), directions=2, mode="forward")
    doc = _assert_passes(jacli.check(model, x.numpy(), directions=3), fmt)  # auto: falls back, with a note
    assert doc["mode"] == "reverse" and any("forward mode is unavailable" in n for n in doc["notes"])
    assert doc["checked"] == 2 * 3 and not doc["adjoint_failures"]
    doc = _assert_passes(jacli.check(model, x.numpy(), mode="reverse"), fmt)  # every entry from VJP rows
    assert doc["kind"] == "columns" and doc["checked"] == 2 * 64 * 64


def test_compute_auto_falls_back_to_reverse_with_a_note(gpt2_paths, run):
    _, head, x, _, lm = gpt2_paths
    np.save(lm.parent / "x.npy", x.numpy())
    r = run("compute", lm, lm.parent / "x.npy", "--trust-model", "-o", lm.parent / "J.npy")
    assert r.code == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "forward mode is unavailable" in line]
    assert len(notes) == 1 and "using reverse mode" in notes[0] and "--mode reverse" not in notes[0]
    ref = corpus.reference_jacobian(head, x)
    np.testing.assert_allclose(np.load(lm.parent / "J.npy"), ref, atol=2e-5 * np.abs(ref).max())
    r = run("check", lm, lm.parent / "x.npy", "--trust-model", "--fd", "--directions", "2", "--json")
    assert r.code == 0, r.stderr


def test_method_fd_falls_back_to_the_models_precision_with_a_note(built, run, tmp_path, monkeypatch):
    """A traced LSTM runs in float64 (its float32 flat weights are retyped in the copy), so
    --method fd differences in float64; where the float64 evaluation fails, it differences
    in float32 and says why, instead of failing."""
    from jacli.backends.torchscript import TorchModel
    from jacli.errors import LimitationError

    module, x, ref, paths = built("lstm", ("trace",))
    np.save(tmp_path / "x.npy", x.numpy())
    args = ("compute", paths["trace"], tmp_path / "x.npy", "--trust-model", "--method", "fd", "-o", tmp_path / "J.npy")
    r = run(*args)
    assert r.code == 0 and "finite differences run in" not in r.stderr, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "J.npy"), ref, atol=1e-6 * np.abs(ref).max())

    def fails(self, xs):
        raise LimitationError("planted: no float64 copy of this model")

    monkeypatch.setattr(TorchModel, "_forward64", fails)
    r = run(*args)
    assert r.code == 0, r.stderr
    assert "finite differences run in float32: the float64 evaluation of the model failed (planted" in r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "J.npy"), ref, atol=3e-3 * np.abs(ref).max())


# --- planted bugs, caught at the default settings ----------------------------------------------
class WrongTanh(torch.autograd.Function):
    """tanh with the derivative 1 - y instead of 1 - y²."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y)


class ScaledRows(torch.autograd.Function):
    """The identity whose gradient is 1.01 times too large for output entries ROWS."""

    ROWS = ((1, 3), (0, 7))  # (channel, position) of the Conv1d net's output, in every sample

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        scale = torch.ones_like(g)
        for c, p in ScaledRows.ROWS:
            scale[:, c, p] = 1.01
        return g * scale


class Planted(torch.nn.Module):
    def __init__(self, inner, bug):
        super().__init__()
        self.inner, self.bug = inner, bug

    def forward(self, x):
        y = self.inner(x)
        return WrongTanh.apply(y) if self.bug == "tanh" else ScaledRows.apply(y)


def _pickled(module, path):
    torch.save(module, str(path))
    return jacli.load(str(path), trust=True)


def test_wrong_custom_autograd_function_is_caught(built, tmp_path):
    module, x, _, _ = built("conv1d", ())
    model = _pickled(Planted(module, "tanh"), tmp_path / "wrong_tanh.pt")
    for kw in ({}, {"directions": 4}, {"directions": 4, "mode": "reverse"}):
        doc = jacli.check(model, x.numpy(), **kw).to_json()
        assert not doc["passed"], kw
        assert doc["failures"] > 0 and {e["diagnosis"] for e in doc["mismatches"]} <= {"wrong-gradient"}
        assert doc["kinks"] == 0, kw  # judged again at nearby points, every wrong entry stays wrong


def test_gradient_one_percent_off_on_a_few_entries_is_located(built, tmp_path):
    module, x, _, _ = built("conv1d", ())
    model = _pickled(Planted(module, "scale"), tmp_path / "scaled.pt")
    doc = jacli.check(model, x.numpy()).to_json()
    assert not doc["passed"] and doc["fd_dtype"] == "float64"
    rows = {(e["sample"], *e["output_index"]) for e in doc["mismatches"]}
    assert rows == {(s, *r) for s in range(2) for r in ScaledRows.ROWS}, rows
    assert all(e["diagnosis"] == "wrong-gradient" for e in doc["mismatches"]) and doc["kinks"] == 0


def test_misplaced_detach_in_attention_is_caught(tmp_path):
    """GPT-2 whose attention values are detach()ed: reverse-only, checked every entry."""

    class Detached(corpus.Attention):
        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v.detach(), is_causal=True)
            return self.proj(y.transpose(1, 2).reshape(b, t, d))

    module = corpus.GPT2(seq=8, dim=16, depth=1, heads=2)
    module.blocks[0].attn = Detached(16, 2, causal=True)
    corpus.randomize(module)
    x = torch.randn(2, 4, 16)
    paths, _ = corpus.save_all(module, x, tmp_path, formats=("trace",))
    model = jacli.load(str(paths["trace"]), trust=True)
    for kw in ({}, {"directions": 3}):
        doc = jacli.check(model, x.numpy(), **kw).to_json()
        assert not doc["passed"] and doc["mode"] == "reverse", kw
        assert all(e["diagnosis"] == "wrong-gradient" for e in doc["mismatches"]) and doc["kinks"] == 0, kw


@pytest.mark.parametrize("fd64", [True, False], ids=["float64-fd", "float32-only"])
def test_wrong_onnx_derivative_rule_is_caught(built, tmp_path, monkeypatch, fd64):
    """A Tanh rule of 1 - y instead of 1 - y² planted into the derivative graphs of a
    Conv1d-GELU-Conv1d-Tanh ONNX model (a fresh file: derived graphs are cached per model)."""
    from jacli.backends.onnx.rules import registry
    from jacli.backends.onnx.rules.elementwise import _c

    module, x, _, _ = built("conv1d", ())
    paths, _ = corpus.save_all(corpus.randomize(corpus.conv1d(), seed=7), x, tmp_path, formats=("onnx",),
                               name=f"planted{int(fd64)}")
    wrong = lambda b, n, v: b.op("Mul", v, b.op("Sub", _c(b, n, 1.0), n.y))  # noqa: E731
    (entry,) = registry.lookup("Tanh", 17)
    monkeypatch.setattr(entry, "vjp", lambda b, n, gs: {0: wrong(b, n, gs[0])})
    monkeypatch.setattr(entry, "jvp", lambda b, n, ts: [wrong(b, n, ts[0])])
    model = jacli.load(str(paths["onnx"]))
    if not fd64:
        model.supports_float64 = False  # as for a graph nothing can evaluate in float64
    for kw in ({}, {"directions": 4}):
        doc = jacli.check(model, x.numpy(), **kw).to_json()
        assert doc["fd_dtype"] == ("float64" if fd64 else "float32")
        assert not doc["passed"] and doc["failures"] > 0, kw
        assert all(e["diagnosis"] == "wrong-gradient" for e in doc["mismatches"]) and doc["kinks"] == 0, kw


def test_directions_stay_within_the_memory_budget(built):
    """FD forward calls are cut to fit half of --max-memory: with a budget of 4 MB, 16
    directions never send 4·16·2 samples at once."""
    module, x, _, paths = built("resnet18", ("trace",))
    model = jacli.load(str(paths["trace"]), trust=True)
    sizes = []
    inner = model._forward64
    model._forward64 = lambda xs: sizes.append(len(next(iter(xs.values())))) or inner(xs)
    _assert_passes(jacli.check(model, x.numpy(), directions=16), "resnet18")
    assert max(sizes) == 4 * 16 * 2  # the default budget holds every FD point at once
    sizes.clear()
    doc = _assert_passes(jacli.check(model, x.numpy(), directions=16, max_memory=4 << 20), "resnet18")
    assert doc["checked"] == 2 * 16 * 5
    assert max(sizes) <= 40, sizes  # (2 MB for FD) / (4 points x 773 elements x 64 bytes): 10 points a call


def test_switch_point_resolved_differently_by_float32_and_float64_is_a_kink(tmp_path):
    """z = ((x0 + 100) − 100) − x0 + x1 is x1 in float64 but x1 − 3e-6 in float32 at
    x0 = 3e-6, x1 = 2e-6: relu(z) is active in float64 and not in the float32 model, though
    no FD step crosses the switch. AD (the float32 model's slope) and float64 FD differ; a
    step SHIFT away they agree: a kink, not a wrong gradient (as in VGG-19 at 224x224)."""

    class Switch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(400, 3, generator=torch.Generator().manual_seed(0)) / 20)

        def forward(self, x):
            z = ((x[:, :1] + 100.0) - 100.0) - x[:, :1] + x[:, 1:2]
            return torch.cat([torch.relu(z), torch.tanh(x @ self.w)], dim=1)

    x = torch.randn(2, 400, generator=torch.Generator().manual_seed(1))
    x[:, 0], x[:, 1] = 3e-6, 2e-6
    paths, _ = corpus.save_all(Switch().eval(), x, tmp_path, formats=("trace",))
    model = jacli.load(str(paths["trace"]), trust=True)
    xs = jacli.api.as_inputs(model, x.numpy())
    out = model.output_names()[0]
    assert model.forward(xs)[out][:, 0].max() == 0 and model.forward64(xs)[out][:, 0].min() > 0
    doc = _assert_passes(jacli.check(model, x.numpy(), directions=4), "switch")
    assert doc["kinks"] == 2 * 4 and {e["output_index"][0] for e in doc["unresolved"]} == {0}


def test_onnx_model_builds_its_session_only_when_run(built):
    """inspect needs the signature only: no onnxruntime session until a forward pass."""
    module, x, _, paths = built("conv1d", ("onnx",))
    for _ in range(2):  # fresh, then with the signature cached
        model = jacli.load(str(paths["onnx"]))
        assert model.describe()["inputs"] and model._session is None
        assert model.forward({"x": x.numpy()})["y"].shape == (2, 3, 12) and model._session is not None
