"""Every loader against independent references: closed forms, a hand-written numpy
backward pass, float64 finite differences — and every format against every other."""
from __future__ import annotations

import numpy as np
import pytest

import jacli
from conftest import SAMPLES, fd_jacobian, map2d_jacobian, mlp_jacobian

MLP = ["mlp.keras", "mlp.h5", "mlp_tfkeras.h5", "mlp_savedmodel", "mlp_tfkeras_savedmodel", "mlp.pt", "mlp.onnx", "mlp_b1.onnx"]
MAP2D = ["map2d.keras", "map2d_savedmodel", "map2d.pt", "map2d.onnx"]
MULTI = ["multi.keras", "multi_savedmodel", "multi.pt", "multi.onnx"]
FORMAT = {"keras": "keras", "h5": "keras", "pt": "torchscript", "onnx": "onnx"}


def _ad_available(model) -> bool:
    try:
        import jacli.backends.onnx_grad  # noqa: F401
    except ImportError:
        return model.format != "onnx"
    return True


def _method(model) -> str:
    """ONNX models differentiate exactly once onnx_grad is present; until then by FD."""
    return "ad" if _ad_available(model) else "fd"


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
    J = jacli.jacobian(model, x, mode=mode, method=_method(model))
    ref = mlp_jacobian(weights, x)
    assert J.shape == (4, 10, 500)
    tol = 2e-3 if _method(model) == "fd" else 1e-5
    np.testing.assert_allclose(J, ref, atol=tol * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("name", MAP2D)
def test_map2d_closed_form(loaded, name):
    model = loaded(name)
    x = np.load(SAMPLES / "map2d_input.npy")
    for mode in ("forward", "reverse"):
        J = jacli.jacobian(model, x, mode=mode, method=_method(model))
        np.testing.assert_allclose(J, map2d_jacobian(x), rtol=1e-5, atol=1e-4 if _method(model) == "fd" else 1e-6)
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
    out = jacli.jacobian(model, xs, method=_method(model))
    # output names differ by format (Keras/ONNX: s, p; TorchScript: output_0, output_1)
    names = {"s": "s", "p": "p"} if "ds/da" in out else {"s": "output_0", "p": "output_1"}
    assert set(out) == {f"d{names[o]}/d{i}" for o in "sp" for i in "ab"}
    for o in "sp":
        for i in "ab":
            J = out[f"d{names[o]}/d{i}"]
            np.testing.assert_allclose(J, ref[(o, i)], atol=2e-4 if _method(model) == "fd" else 2e-6, rtol=1e-4)


def test_every_format_gives_the_same_mlp_jacobian(loaded):
    x = np.random.default_rng(7).standard_normal((3, 500)).astype(np.float32)
    results = {n: jacli.jacobian(loaded(n), x, method=_method(loaded(n))) for n in MLP}
    exact = {n: J for n, J in results.items() if _method(loaded(n)) == "ad"}
    base = exact["mlp.pt"]
    for n, J in exact.items():
        np.testing.assert_allclose(J, base, rtol=0, atol=1e-6 * np.abs(base).max(), err_msg=n)
    for n, J in results.items():  # finite differences (ONNX before exact AD): float32 FD accuracy
        np.testing.assert_allclose(J, base, rtol=0, atol=2e-3 * np.abs(base).max(), err_msg=n)


@pytest.mark.parametrize("name", ["mlp.keras", "mlp_savedmodel", "mlp.pt", "mlp.onnx"])
def test_no_batch_has_cross_sample_zeros(loaded, weights, name):
    model = loaded(name)
    x = np.load(SAMPLES / "mlp_input.npy")[:2]
    J = jacli.jacobian(model, x, batch=False, method=_method(model))
    assert J.shape == (2, 10, 2, 500)
    ref = mlp_jacobian(weights, x)
    tol = 2e-3 if _method(model) == "fd" else 1e-5
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
                                      ("mlp.pt", "torchscript"), ("mlp.onnx", "onnx")])
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


def test_fd_method_agrees_with_ad(loaded, weights):
    model = loaded("mlp.pt")
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
