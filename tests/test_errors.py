"""Errors by cause (jacli/errors.py): the user's input and limitations exit 2, jacli's own
bugs exit 3; each keeps the framework's root cause; the CLI renders the option that works
where Python users get the equivalent argument."""
from __future__ import annotations

import numpy as np
import pytest

import jacli
from conftest import SAMPLES, run_jacli as run
from jacli.errors import (InputError, InternalError, JacliError, LimitationError, ModelLoadError, UnsupportedError,
                          UserError, root_cause)


def _one_error_line(r, code: int) -> str:
    assert r.code == code, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def test_kinds_and_exit_codes():
    assert issubclass(ModelLoadError, UserError) and issubclass(InputError, UserError)
    assert UnsupportedError is LimitationError and issubclass(LimitationError, JacliError)
    assert (UserError.exit_code, LimitationError.exit_code, InternalError.exit_code) == (2, 2, 3)
    assert {UserError.kind, LimitationError.kind, InternalError.kind} == {"input", "limitation", "bug"}


def test_python_users_get_the_hint_the_cli_gets_the_option():
    e = LimitationError("no gradient for ResizeArea", operator="ResizeArea", option="--method fd", hint="method='fd'")
    assert str(e) == "no gradient for ResizeArea; use method='fd'"
    assert e.cli_message() == "no gradient for ResizeArea; use --method fd"
    assert "please report" in str(InternalError("a derived graph failed"))


def test_root_cause_is_the_innermost_error_line():
    torchscript = RuntimeError(
        "The following operation failed in the TorchScript interpreter.\n"
        "Traceback of TorchScript, serialized code (most recent call last):\n"
        '  File "code/__torch__.py", line 9, in forward\n'
        "    x = torch.embedding(weight, input_ids)\n"
        "RuntimeError: Expected tensor for argument #1 'indices' to have one of the following scalar types: "
        "Long, Int; but got torch.FloatTensor instead\n")
    assert root_cause(torchscript).startswith("RuntimeError: Expected tensor for argument #1 'indices'")
    keras = TypeError("<class 'X'> could not be deserialized properly.\n\nconfig={'a': 1}.\n\nException encountered: "
                      "Could not locate class 'ScaledSoftsign'. Make sure ... Full object config: {'module': 'm'}")
    assert root_cause(keras) == "Could not locate class 'ScaledSoftsign'. Make sure ..."
    try:
        try:
            raise ValueError("in user code:\n\n    File \"f.py\", line 3\n\n    ValueError: the real reason\n")
        except ValueError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as outer:
        assert root_cause(outer) == "ValueError: the real reason"


# --- one test per kind, through the CLI ------------------------------------------------------
def test_the_users_input_keeps_the_frameworks_root_cause(tmp_path):
    """A TorchScript MLP given 7 features instead of 500: torch's own reason, not its first line."""
    np.save(tmp_path / "x.npy", np.ones((2, 7), np.float32))
    line = _one_error_line(run("compute", SAMPLES / "mlp.pt", tmp_path / "x.npy"), 2)
    assert "the model rejected the input" in line and "2x7 and 500x100" in line
    assert "The following operation failed" not in line


@pytest.fixture(scope="module")
def area_model(tmp_path_factory):
    """A Keras model whose area resizing (ResizeArea) has no gradient in TensorFlow."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    x = keras.Input((4, 4, 1), name="a")
    model = keras.Model(x, keras.layers.Flatten()(keras.layers.Resizing(2, 2, interpolation="area")(x)))
    path = tmp_path_factory.mktemp("area") / "area.keras"
    model.save(path)
    return path


def test_a_limitation_names_the_operation_and_the_option_that_works(area_model):
    for mode in ("reverse", "forward"):
        line = _one_error_line(run("compute", area_model, "--random", "2", "--mode", mode), 2)
        assert "no gradient for the operation ResizeArea" in line and "use --method fd" in line
    assert run("compute", area_model, "--random", "2", "--method", "fd", "-q").code == 0  # and it does work
    with pytest.raises(LimitationError, match="use method='fd'") as caught:
        jacli.jacobian(jacli.load(area_model), np.ones((1, 4, 4, 1), np.float32))
    assert caught.value.operator == "ResizeArea"


def test_a_torch_operator_without_a_derivative_is_a_limitation(tmp_path):
    import torch

    class Zeta(torch.nn.Module):
        def forward(self, x):
            return torch.special.zeta(x + 2, torch.ones_like(x))

    torch.jit.save(torch.jit.script(Zeta()), tmp_path / "zeta.pt")
    np.save(tmp_path / "x.npy", np.full((2, 3), 0.5, np.float32))
    for mode in ("reverse", "forward"):  # forward mode's fallback needs the same derivative
        line = _one_error_line(run("compute", tmp_path / "zeta.pt", tmp_path / "x.npy", "--mode", mode), 2)
        assert "no derivative for the operator zeta" in line and "use --method fd" in line
    with pytest.raises(LimitationError) as caught:
        jacli.jacobian(jacli.load(tmp_path / "zeta.pt"), np.full((2, 3), 0.5, np.float32))
    assert caught.value.operator == "zeta"


def test_a_failure_inside_a_derived_graph_is_a_bug(monkeypatch, tmp_path):
    """A derivative graph jacli builds that fails where the model's forward pass runs is
    jacli's bug: exit 3, "please report", and TensorFlow's reason kept. The failure is planted
    in the graph jacli derives for the VJP (a check that no real input can pass)."""
    import tensorflow as tf

    from jacli.backends import tf as tf_backend

    def broken(fn):
        def planted(*args):
            return tf.nest.map_structure(
                lambda g: tf.debugging.check_numerics(g / 0.0 * 0.0, "planted bug in the derived graph"),
                fn.python_function(*args))

        return tf.function(planted)

    original = tf_backend.TFModel.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        for name in ("_vjp_fn", "_vjp_map_fn", "_vjp_seq_fn", "_vjp_unrolled_fn"):
            setattr(self, name, broken(getattr(self, name)))

    monkeypatch.setattr(tf_backend.TFModel, "__init__", init)
    np.save(tmp_path / "x.npy", np.load(SAMPLES / "map2d_input.npy"))
    line = _one_error_line(run("compute", SAMPLES / "map2d.keras", tmp_path / "x.npy", "--mode", "reverse"), 3)
    assert "planted bug in the derived graph" in line and "please report" in line
    assert "rejected the input" not in line
    assert run("compute", SAMPLES / "map2d.keras", tmp_path / "x.npy", "--mode", "forward", "-q").code == 0


def test_a_failure_inside_a_derived_onnx_graph_is_a_bug(monkeypatch, tmp_path):
    """onnxruntime failing on the VJP graph jacli derived, where the model's own forward pass
    runs at the same input, is jacli's bug (exit 3), not "the model rejected the input";
    the same input against the model itself is still the user's (exit 2)."""
    import onnx
    from onnx import TensorProto, helper

    from jacli.backends.onnx.rules import registry

    g = helper.make_graph([helper.make_node("Tanh", ["x"], ["y"], name="act")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])])
    path = tmp_path / "tanh.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    # a planted rule whose graph fails at run time: 3 cotangent entries per sample reshaped by 7
    (entry,) = registry.lookup("Tanh", 17)
    monkeypatch.setattr(entry, "vjp", lambda b, n, gs: {0: b.op("Reshape", gs[0], b.ints([-1, 7]))})
    r = run("compute", path, tmp_path / "x.npy", "--mode", "reverse", "-q", "-o", tmp_path / "J.npy")
    assert r.code == 3, r.stderr
    line = r.stderr.strip()
    assert line.startswith("Error:") and "\n" not in line and "VJP graph" in line and "please report" in line
    assert "--method fd" in line and not (tmp_path / "J.npy").exists()
    np.save(tmp_path / "bad.npy", np.zeros((2, 4), np.float32))  # the model itself refuses this one
    r = run("compute", path, tmp_path / "bad.npy", "--mode", "reverse", "-q")
    assert r.code == 2 and r.stderr.startswith("Error:"), r.stderr


@pytest.mark.parametrize("declared", [["n"], ["n", 4]])
def test_an_onnx_output_declared_with_another_shape_is_the_files_error(tmp_path, declared):
    """A file whose declared output shape (rank, or a static size) contradicts what its graph
    computes (found by the fuzzer: one flipped bit in map2d.onnx made f's (?, 2) a (?,)) is
    refused, exit 2, naming the output: jacli's derived graphs take cotangents of the declared
    shape, and onnxruntime then failed inside them (exit 3, "a bug in jacli")."""
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Tanh", ["x"], ["y"], name="act")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, declared)])
    path = tmp_path / "tanh.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    for mode in ("reverse", "forward"):
        line = _one_error_line(run("compute", path, tmp_path / "x.npy", "--mode", mode, "-o", tmp_path / "J.npy"), 2)
        assert "output 'y'" in line and "(2, 3)" in line and "please report" not in line, line
        assert not (tmp_path / "J.npy").exists()
