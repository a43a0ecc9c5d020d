"""Every loader against independent references: closed forms, a hand-written numpy
backward pass, float64 finite differences — and every format against every other."""
from __future__ import annotations

import json

import numpy as np
import pytest

import generate
import jacli
from conftest import SAMPLES, fd_jacobian, map2d_jacobian, mlp_jacobian, run_jacli

MLP = ["mlp.keras", "mlp.h5", "mlp_tfkeras.h5", "mlp_savedmodel", "mlp_tfkeras_savedmodel", "mlp.pt", "mlp.pt2", "mlp.onnx",
       "mlp_b1.onnx"]
MAP2D = ["map2d.keras", "map2d_savedmodel", "map2d.pt", "map2d.onnx"]
MULTI = ["multi.keras", "multi_savedmodel", "multi.pt", "multi.onnx"]
FORMAT = {"keras": "keras", "h5": "keras", "pt": "torchscript", "onnx": "onnx"}


@pytest.fixture(scope="module")
def loaded():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = jacli.load(SAMPLES / name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", MLP)
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_mlp_matches_numpy_backward_pass(loaded, weights, name, mode):
    model = loaded(name)
    x = np.load(SAMPLES / "mlp_input.npy")
    J = jacli.jacobian(model, x, mode=mode, method="ad")
    ref = mlp_jacobian(weights, x)
    assert J.shape == (4, 10, 500)
    tol = 1e-5
    np.testing.assert_allclose(J, ref, atol=tol * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("name", MAP2D)
def test_map2d_closed_form(loaded, name):
    model = loaded(name)
    x = np.load(SAMPLES / "map2d_input.npy")
    for mode in ("forward", "reverse"):
        J = jacli.jacobian(model, x, mode=mode, method="ad")
        np.testing.assert_allclose(J, map2d_jacobian(x), rtol=1e-5, atol=1e-6)
    # at (1.5, 0.5): [[3, -1], [1, 3]]
    np.testing.assert_allclose(J[0], [[3, -1], [1, 3]], atol=1e-4)


def _multi_ref(weights, a, b):
    W, V = weights["W"].astype(np.float64), weights["V"].astype(np.float64)
    return {
        ("s", "a"): fd_jacobian(lambda a_: np.tanh(np.concatenate([a_, b], 1) @ W), a),
        ("s", "b"): fd_jacobian(lambda b_: np.tanh(np.concatenate([a, b_], 1) @ W), b),
        ("p", "a"): fd_jacobian(lambda a_: a_ * (b @ V), a),
        ("p", "b"): fd_jacobian(lambda b_: a * (b_ @ V), b),
    }


@pytest.mark.parametrize("name", MULTI)
def test_multi_input_output_against_float64_fd(loaded, weights, name):
    model = loaded(name)
    data = np.load(SAMPLES / "multi_input.npz")
    xs = {"a": data["a"], "b": data["b"]}
    ref = _multi_ref(weights, xs["a"].astype(np.float64), xs["b"].astype(np.float64))
    out = jacli.jacobian(model, xs, method="ad")
    # output names differ by format (Keras/ONNX: s, p; TorchScript: output_0, output_1)
    names = {"s": "s", "p": "p"} if "ds/da" in out else {"s": "output_0", "p": "output_1"}
    assert set(out) == {f"d{names[o]}/d{i}" for o in "sp" for i in "ab"}
    for o in "sp":
        for i in "ab":
            J = out[f"d{names[o]}/d{i}"]
            np.testing.assert_allclose(J, ref[(o, i)], atol=2e-6, rtol=1e-4)


def test_every_format_gives_the_same_mlp_jacobian(loaded):
    x = np.random.default_rng(7).standard_normal((3, 500)).astype(np.float32)
    results = {n: jacli.jacobian(loaded(n), x, method="ad") for n in MLP}
    base = results["mlp.pt"]
    for n, J in results.items():
        np.testing.assert_allclose(J, base, rtol=0, atol=1e-6 * np.abs(base).max(), err_msg=n)


@pytest.mark.parametrize("name", ["mlp.keras", "mlp_savedmodel", "mlp.pt", "mlp.pt2", "mlp.onnx"])
def test_no_batch_has_cross_sample_zeros(loaded, weights, name):
    model = loaded(name)
    x = np.load(SAMPLES / "mlp_input.npy")[:2]
    J = jacli.jacobian(model, x, batch=False, method="ad")
    assert J.shape == (2, 10, 2, 500)
    ref = mlp_jacobian(weights, x)
    tol = 1e-5
    for b in range(2):
        np.testing.assert_allclose(J[b, :, b], ref[b], atol=tol * np.abs(ref).max())
        assert np.abs(J[b, :, 1 - b]).max() <= tol * np.abs(ref).max()


def test_fixed_batch_model_takes_any_batch(loaded, weights):
    model = loaded("mlp_b1.onnx")
    assert model.inputs[0].shape == (1, 500)
    x = np.random.default_rng(3).standard_normal((5, 500)).astype(np.float32)
    y = model.forward({"x": x})["probs"]
    assert y.shape == (5, 10)
    np.testing.assert_allclose(y, __import__("generate").mlp_numpy(weights, x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,fmt", [("mlp.keras", "keras"), ("mlp.h5", "keras"), ("mlp_savedmodel", "savedmodel"),
                                      ("mlp.pt", "torchscript"), ("mlp.pt2", "torch-export"), ("mlp.onnx", "onnx")])
def test_format_detection_and_signature(loaded, name, fmt):
    model = loaded(name)
    assert model.format == fmt
    if fmt != "torchscript":  # TorchScript carries no shapes
        assert model.inputs[0].shape[1:] == (500,)
        assert model.outputs[0].shape[1:] == (10,)


@pytest.mark.parametrize("chunk", [1, 3, 7, 500])
def test_block_size_does_not_change_the_result(loaded, weights, chunk):
    model = loaded("mlp.pt")
    x = np.load(SAMPLES / "mlp_input.npy")
    ref = mlp_jacobian(weights, x)
    for mode in ("forward", "reverse"):
        J = jacli.jacobian(model, x, mode=mode, chunk_size=chunk)
        np.testing.assert_allclose(J, ref, atol=1e-5 * np.abs(ref).max())


def test_wrt_and_of_select_pairs(loaded):
    model = loaded("multi.keras")
    data = np.load(SAMPLES / "multi_input.npz")
    J = jacli.jacobian(model, {"a": data["a"], "b": data["b"]}, wrt="b", of="p")
    assert isinstance(J, np.ndarray) and J.shape == (3, 3, 4)


@pytest.mark.parametrize("name", ["mlp.pt", "mlp.pt2"])
def test_fd_method_agrees_with_ad(loaded, weights, name):
    model = loaded(name)
    assert model.supports_float64
    x = np.load(SAMPLES / "mlp_input.npy")
    J = jacli.jacobian(model, x, method="fd")  # float64 evaluation: near-exact
    np.testing.assert_allclose(J, mlp_jacobian(weights, x), atol=1e-7)


def test_torchscript_output_that_does_not_depend_on_the_input(tmp_path):
    """A detached output has a zero Jacobian in both modes (reverse mode must not crash)."""
    import torch

    class M(torch.nn.Module):
        def forward(self, x):
            return x * 2, (x * 3).detach().sum(dim=1)

    torch.jit.save(torch.jit.script(M()), tmp_path / "m.pt")
    model = jacli.load(tmp_path / "m.pt")
    x = np.ones((2, 3), np.float32)
    for mode in ("reverse", "forward"):
        J = jacli.jacobian(model, x, mode=mode)
        np.testing.assert_array_equal(J["doutput_0/dx"], np.broadcast_to(2 * np.eye(3), (2, 3, 3)))
        np.testing.assert_array_equal(J["doutput_1/dx"], np.zeros((2, 3)))


@pytest.mark.parametrize("detached", [False, True])
def test_torchscript_is_frozen_unless_freezing_would_drop_a_detach(tmp_path, detached):
    """Freezing folds the batch norm into the convolution; it also drops ``detach()``, which
    would change the Jacobian: then the module runs as loaded. Either way the Jacobian is
    torch's own in float64."""
    import torch

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3)

        def forward(self, x):
            y = torch.tanh(self.bn(self.conv(x)))
            return y * (x.detach() if detached else x).mean(dim=1, keepdim=True)

    module = M()
    torch.manual_seed(0)
    with torch.no_grad():
        module.bn.running_mean.normal_(), module.bn.running_var.uniform_(0.5, 2), module.bn.weight.normal_()
    x = np.random.default_rng(0).standard_normal((2, 2, 4, 4)).astype(np.float32)
    torch.jit.save(torch.jit.trace(module.eval(), torch.from_numpy(x)), tmp_path / "m.pt")
    model = jacli.load(tmp_path / "m.pt")
    assert list(model.module.parameters())  # not frozen before its first use
    module.double()
    f = lambda v: module(v[None])[0]  # noqa: E731
    ref = torch.func.vmap(torch.func.jacrev(f))(torch.from_numpy(x).double()).detach().numpy().reshape(2, 48, 32)
    for mode in ("reverse", "forward"):
        J = jacli.jacobian(model, x, mode=mode).reshape(2, 48, 32)
        np.testing.assert_allclose(J, ref, atol=1e-5 * np.abs(ref).max())
        assert ("aten::batch_norm" in str(model.module.inlined_graph)) == detached


# --- torch.export programs (.pt2) -------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory, weights):
    """As .pt2 files: the MLP exported at a fixed batch of 1, and the two-input, two-output
    model with a dynamic batch (with the output names its program records)."""
    import torch

    d = tmp_path_factory.mktemp("pt2")
    modules = generate.torch_modules(weights)
    multi = generate.export_program(modules["multi"], (torch.zeros(2, 3), torch.zeros(2, 4)))
    mlp_b1 = generate.export_program(modules["mlp"], (torch.zeros(1, 500),), dynamic_batch=False)
    torch.export.save(mlp_b1, d / "mlp_b1.pt2")
    torch.export.save(multi, d / "multi.pt2")
    outputs = list(multi.graph_signature.user_outputs)
    return {"mlp_b1": d / "mlp_b1.pt2", "multi": d / "multi.pt2", "multi_outputs": outputs}


def test_torch_export_fixed_batch_takes_any_batch(exported, weights):
    model = jacli.load(exported["mlp_b1"])
    assert model.inputs[0].shape == (1, 500) and model.outputs[0].shape == (1, 10)
    x = np.random.default_rng(3).standard_normal((5, 500)).astype(np.float32)
    ref = mlp_jacobian(weights, x)
    for mode in ("reverse", "forward"):
        J = jacli.jacobian(model, x, mode=mode)
        assert J.shape == (5, 10, 500)
        np.testing.assert_allclose(J, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
    np.testing.assert_allclose(jacli.jacobian(model, x, method="fd"), ref, atol=1e-7)  # float64, in pieces of 1


def test_torch_export_multi_input_output_named_as_the_program_records(exported, weights):
    model = jacli.load(exported["multi"])
    s, p = exported["multi_outputs"]  # the graph's own names for tanh(...) and a * (b V)
    assert model.input_names() == ["a", "b"] and model.output_names() == [s, p] == ["tanh", "mul"]
    data = np.load(SAMPLES / "multi_input.npz")
    xs = {"a": data["a"], "b": data["b"]}
    ref = _multi_ref(weights, xs["a"].astype(np.float64), xs["b"].astype(np.float64))
    for mode in ("reverse", "forward"):
        out = jacli.jacobian(model, xs, mode=mode)
        assert set(out) == {f"d{o}/d{i}" for o in (s, p) for i in "ab"}
        for o, name in (("s", s), ("p", p)):
            for i in "ab":
                np.testing.assert_allclose(out[f"d{name}/d{i}"], ref[(o, i)], atol=2e-6, rtol=1e-4)


def test_torch_export_check_fd_passes_in_float64(exported):
    r = run_jacli("check", exported["multi"], SAMPLES / "multi_input.npz", "--fd", "--json")
    doc = json.loads(r.stdout)
    assert r.code == 0 and doc["passed"] is True and doc["format"] == "torch-export"
    assert doc["fd_dtype"] == "float64" and doc["checked"] == 3 * (5 + 3) * (3 + 4)
    assert doc["max_abs_error"] < 1e-5


def test_torch_export_inspect_shows_the_recorded_signature(exported):
    r = run_jacli("inspect", exported["multi"], "--json")
    doc = json.loads(r.stdout)
    assert r.code == 0 and (doc["format"], doc["backend"]) == ("torch-export", "torch")
    def spec(name, size):
        return {"name": name, "shape": [None, size], "dtype": "float32"}

    assert doc["inputs"] == [spec("a", 3), spec("b", 4)]
    assert doc["outputs"] == [spec("tanh", 5), spec("mul", 3)]
    text = run_jacli("inspect", exported["mlp_b1"]).out
    assert "(1, 500)" in text and "softmax" in text and "torch-export" in text


def test_torch_export_guards_hold_on_the_plain_path(tmp_path):
    """A program is called through its own checks once per signature of the inputs, then as
    its plain graph: the same derivatives, no pre-hook on a signature seen before, and the
    program's shape guards (a batch range, two inputs' equal batch sizes, a fixed feature
    size) still refuse inputs that break them, however many calls passed before."""
    import torch

    from jacli.errors import InputError

    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, a, b):
            return torch.nn.functional.gelu(self.lin(a)) * torch.tanh(b)

    torch.manual_seed(0)
    net = Gated().eval()
    ab = (torch.randn(2, 3), torch.randn(2, 3))
    batch = torch.export.Dim("batch", min=1, max=6)
    torch.export.save(torch.export.export(net, ab, dynamic_shapes=({0: batch}, {0: batch})), tmp_path / "g.pt2")
    model = jacli.load(tmp_path / "g.pt2")
    rng = np.random.default_rng(0)
    xs = {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal((4, 3)).astype(np.float32)}
    net.double()
    f = lambda a, b: net(a[None], b[None])[0]  # noqa: E731
    a64, b64 = (torch.from_numpy(xs[k]).double() for k in "ab")
    ref = torch.func.vmap(torch.func.jacrev(f, argnums=(0, 1)))(a64, b64)
    calls = []
    for mode in ("reverse", "forward", "reverse"):
        J = jacli.jacobian(model, xs, mode=mode)
        for name, r in zip("ab", ref):
            np.testing.assert_allclose(J[f"dmul/d{name}"], r.detach().numpy(), atol=1e-6)
        if not calls:  # the program's own call has run for these signatures: hook it from now on
            model.module.register_forward_pre_hook(lambda *args: calls.append(args))
    assert calls == [] and model._checked and model._plain
    np.testing.assert_allclose(model.forward(xs)["mul"], net(a64, b64).detach().numpy(), atol=1e-6)
    for bad in ({"a": np.zeros((7, 3), np.float32), "b": np.zeros((7, 3), np.float32)},  # batch > 6
                {"a": np.zeros((4, 3), np.float32), "b": np.zeros((3, 3), np.float32)},  # unequal batches
                {"a": np.zeros((4, 5), np.float32), "b": np.zeros((4, 5), np.float32)}):  # 5 features, not 3
        with pytest.raises(InputError):
            model.forward(bad)
    # each new signature, and only those, went through the program's own call
    assert {tuple(tuple(t.shape) for t in args[1]) for args in calls} == {((7, 3), (7, 3)), ((4, 3), (3, 3)),
                                                                         ((4, 5), (4, 5))}


def test_torch_export_keyword_inputs_and_dict_outputs(tmp_path):
    """The program is called with its own argument structure (here a keyword argument), and
    its outputs flattened in its own order (here a dict's) take the dict's keys."""
    import torch

    class Scaled(torch.nn.Module):
        def forward(self, x, *, scale):
            return {"y": x * scale, "z": x.sum(dim=1)}

    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    batch = torch.export.Dim("batch")
    program = torch.export.export(Scaled(), (x,), {"scale": x + 1},
                                  dynamic_shapes={"x": {0: batch}, "scale": {0: batch}})
    torch.export.save(program, tmp_path / "scaled.pt2")
    model = jacli.load(tmp_path / "scaled.pt2")
    assert model.input_names() == ["x", "scale"] and model.output_names() == ["y", "z"]
    xs = {"x": x.numpy(), "scale": (x + 1).numpy()}
    J = jacli.jacobian(model, xs)
    np.testing.assert_allclose(J["dy/dx"], np.stack([np.diag(v) for v in xs["scale"]]))
    np.testing.assert_allclose(J["dy/dscale"], np.stack([np.diag(v) for v in xs["x"]]))
    np.testing.assert_allclose(J["dz/dx"], np.ones((2, 3)))
    np.testing.assert_allclose(J["dz/dscale"], np.zeros((2, 3)))


def test_torch_export_forward_mode_without_forward_rules(tmp_path):
    """Attention runs as an operator without a forward-mode rule: forward mode falls back to
    the double-VJP product and agrees with reverse mode; with several heads that operator
    has no second derivative either, and forward mode says so in one line."""
    import torch
    from jacli.errors import UnsupportedError

    class Attention(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    rng = np.random.default_rng(0)
    for shape in ((2, 4, 8), (2, 2, 4, 8)):
        x = rng.standard_normal(shape).astype(np.float32)
        torch.export.save(generate.export_program(Attention(), (torch.from_numpy(x),)), tmp_path / "attention.pt2")
        model = jacli.load(tmp_path / "attention.pt2")
        reverse = jacli.jacobian(model, x, mode="reverse")
        assert reverse.shape == (*shape, *shape[1:]) and np.abs(reverse).max() > 0.1
        np.testing.assert_allclose(jacli.jacobian(model, x, method="fd"), reverse, atol=1e-5)
        if len(shape) == 3:
            np.testing.assert_allclose(jacli.jacobian(model, x, mode="forward"), reverse, atol=1e-5)
        else:
            with pytest.raises(UnsupportedError, match="second derivative.*use mode='reverse'"):
                jacli.jacobian(model, x, mode="forward")


def test_torch_export_control_flow(tmp_path):
    """torch.cond: reverse mode is exact (the VJP map falls back from vmap, which cannot
    batch cond, to sequential backward passes); forward-mode AD would give empty tangents
    through it, so forward mode is refused in one line instead of returning zeros."""
    import torch
    from jacli.errors import UnsupportedError

    class Branch(torch.nn.Module):
        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda t: torch.sin(t) * 2, lambda t: torch.cos(t), (x,))

    x = np.abs(np.random.default_rng(0).standard_normal((3, 4))).astype(np.float32) + 0.1  # the sin branch
    torch.export.save(generate.export_program(Branch(), (torch.from_numpy(x),)), tmp_path / "branch.pt2")
    model = jacli.load(tmp_path / "branch.pt2")
    expected = np.stack([np.diag(2 * np.cos(v)) for v in x])
    np.testing.assert_allclose(jacli.jacobian(model, x, mode="reverse"), expected, rtol=1e-5, atol=1e-6)
    J = jacli.jacobian(model, x, mode="reverse", batch=False)
    np.testing.assert_allclose(np.stack([J[b, :, b] for b in range(3)]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jacli.jacobian(model, x, method="fd"), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(UnsupportedError, match="no tangents through cond.*use mode='reverse'"):
        jacli.jacobian(model, x, mode="forward")


@pytest.mark.filterwarnings("ignore:The tensor attributes self.lstm")  # torch's export of nn.LSTM
def test_torch_export_float64_follows_dtypes_in_the_graph(tmp_path):
    """An LSTM's export creates its initial state with dtype=float32; the float64 copy for
    finite differences retargets such dtypes, so FD runs in float64 and agrees with AD."""
    import torch

    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lstm = torch.nn.LSTM(3, 4, batch_first=True)

        def forward(self, x):
            return self.lstm(x)[0]

    x = np.random.default_rng(1).standard_normal((2, 5, 3)).astype(np.float32)
    torch.export.save(generate.export_program(Recurrent(), (torch.from_numpy(x),)), tmp_path / "lstm.pt2")
    model = jacli.load(tmp_path / "lstm.pt2")
    y64 = model.forward64({"x": x.astype(np.float64)})[model.output_names()[0]]
    assert y64.dtype == np.float64
    reverse = jacli.jacobian(model, x, mode="reverse")
    np.testing.assert_allclose(jacli.jacobian(model, x, method="fd"), reverse, atol=1e-6)
    np.testing.assert_allclose(jacli.jacobian(model, x, mode="forward"), reverse, atol=1e-6)
