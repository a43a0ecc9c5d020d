"""Untrusted files that fooled earlier checks, and faults while reading and writing (issue 11).

Every hostile model's payload creates a marker file, and is shown to be live (the framework
itself, or jacli with --trust-model, runs it); jacli without --trust-model must refuse it
with one ``Error:`` line and exit 2, the marker absent. Faults (a full disk, a closed pipe,
an output naming an input) end the same way, with nothing lost.
"""
from __future__ import annotations

import errno
import io
import os
import resource
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import _security_models as evil
from jacli import limits
from jacli.backends import keras_checks, savedmodel_checks, torch_checks
from test_security import OLD, X3, assert_refused, error_lines

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"


def assert_one_error(result, *words: str, code: int = 2) -> str:
    lines = error_lines(result.stderr if isinstance(result.stderr, str) else result.stderr.decode())
    assert result.code == code, lines
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in lines[0], lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("untrusted")
    np.save(d / "x3.npy", X3)
    return d


@pytest.fixture
def marker(d):
    path = d / "MARKER"
    path.unlink(missing_ok=True)
    yield path
    path.unlink(missing_ok=True)


# --- 1 and 5: Keras files read the way Keras opens them -------------------------------------
@pytest.fixture(scope="module")
def polyglots(d):
    return evil.keras_polyglots(d, str(d / "MARKER"))


@pytest.mark.parametrize("kind, args, words", [
    ("zip_h5", [], ["polyglot.h5"]),
    ("zip_h5", ["--format", "keras"], ["not an HDF5 file"]),
    ("userblock", ["--format", "keras"], ["neither a .keras zip archive nor an HDF5"]),
    ("prefixed", [], ["not a valid .keras file"]),
    ("prefixed", ["--format", "keras", "--trust-model"], ["not a .keras zip archive"]),
])
def test_keras_polyglots_and_offset_archives_are_refused(jacli, d, polyglots, marker, kind, args, words):
    assert_one_error(jacli("compute", polyglots[kind], d / "x3.npy", *args, "--json"), *words)
    assert not marker.exists()


def test_keras_polyglot_payloads_are_live(polyglots, marker):
    """What the framework does with these files by itself: the lambda runs."""
    import keras
    import tf_keras

    for kind in ("zip_h5", "userblock"):
        tf_keras.models.load_model(polyglots[kind], compile=False, safe_mode=True)  # safe_mode is ignored
        assert marker.exists(), kind
        marker.unlink()
    keras.config.enable_unsafe_deserialization()
    try:
        keras.saving.load_model(polyglots["prefixed"], compile=False)
    finally:
        keras.config.disable_unsafe_deserialization() if hasattr(keras.config, "disable_unsafe_deserialization") \
            else None
    assert marker.exists()


@pytest.mark.parametrize("edit, words", [
    (lambda c: c["config"]["layers"][1].update(class_name="TFSMLayer"), ["TFSMLayer"]),
    (lambda c: c["config"]["layers"][1].update(class_name="NotAKerasLayer"), ["'NotAKerasLayer'", "not one of Keras"]),
    (lambda c: c["config"]["layers"][1].update(registered_name="evil>Dense"), ["registered as 'evil>Dense'"]),
    (lambda c: c["config"]["layers"][1].update(module="keras_evil.layers"), ["module 'keras_evil.layers'"]),
    (lambda c: c["config"]["layers"][1]["config"].update(
        activation={"module": "builtins", "class_name": "function", "config": "exec", "registered_name": None}),
     ["function 'exec'"]),
])
def test_keras_classes_must_be_keras_own(jacli, tmp_path, edit, words):
    path = tmp_path / "edited.keras"
    evil.keras_with_config(SAMPLES / "mlp.keras", path, edit)
    assert_refused(jacli("inspect", path), *words)


@pytest.fixture(scope="module")
def keras_ops_model(d):
    """A Keras 3 functional model with keras.ops calls, recorded as Operation classes
    (GetItem, Exp, Multiply from keras.src.ops.numpy) in its config."""
    import keras

    x = keras.Input((4,), name="x")
    y = keras.ops.exp(x[:, :2]) * x[:, 2:]
    path = d / "ops.keras"
    keras.Model(x, y).save(path)
    return path


@pytest.fixture(scope="module")
def keras_ops_h5(d):
    """The same model as Keras 3 writes it to .h5: its operations recorded by class name
    only, no module (Keras 3 cannot read this file back: it rebuilds ``Multiply`` as the
    merge layer; jacli maps such entries to the operations, keras_checks.hdf5_objects)."""
    import keras

    x = keras.Input((4,), name="x")
    y = keras.ops.exp(x[:, :2]) * x[:, 2:]
    path = d / "ops.h5"
    keras.Model(x, y).save(path)
    return path


def _op_layer(config, cls):
    return next(layer for layer in config["config"]["layers"] if layer["class_name"] == cls)


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_keras_ops_operations_load_untrusted(jacli, keras_ops_model, keras_ops_h5, tmp_path, fmt):
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = jacli("compute", keras_ops_model if fmt == "keras" else keras_ops_h5, tmp_path / "x.npy",
              "-o", tmp_path / "J.npy", "-q")
    assert r.code == 0, r.stderr
    J = np.load(tmp_path / "J.npy")
    expected = np.zeros((3, 2, 4), np.float32)  # y_i = exp(x_i) x_{i+2}
    for i in range(2):
        expected[:, i, i] = np.exp(x[:, i]) * x[:, i + 2]
        expected[:, i, i + 2] = np.exp(x[:, i])
    np.testing.assert_allclose(J, expected, rtol=1e-5)


def test_keras_h5_classes_must_be_keras_own(jacli, tmp_path):
    """An HDF5 config records no modules: a class name that is neither a Keras layer nor an
    operation is refused by the check (it once passed it, and only Keras's lookup failed)."""
    path = tmp_path / "edited.h5"
    evil.h5_with_config(SAMPLES / "mlp.h5", path, lambda c: c["config"]["layers"][1].update(class_name="NotAKerasLayer"))
    line = assert_refused(jacli("inspect", path), "'NotAKerasLayer'", "outside Keras", "--custom-objects")
    assert "Unknown layer" not in line  # the check's words, not Keras's


def test_keras_application_layers_only_from_their_module(jacli, tmp_path):
    """ConvNeXt's LayerScale is allowed as Keras's own only under the module that defines it."""
    def edit(c):
        layer = c["config"]["layers"][1]
        layer.update(class_name="LayerScale", registered_name="LayerScale", module=module)
        layer["config"].update(init_values=0.5, projection_dim=8)

    for module, refused in (("keras.src.applications.vit", True), ("keras.src.applications.convnext", False)):
        path = tmp_path / "edited.keras"
        evil.keras_with_config(SAMPLES / "mlp.keras", path, edit)
        r = jacli("inspect", path)
        if refused:
            assert_refused(r, "'LayerScale'", "not one of Keras")
        else:  # past the check: Keras builds it (a projection of 8 where the MLP has other widths, or loads)
            assert "refusing" not in r.stderr and "not one of Keras" not in r.stderr, r.stderr


@pytest.mark.parametrize("fmt, edit, words", [
    ("keras", lambda c: _op_layer(c, "Exp").update(class_name="Cond", registered_name="Cond"), ["'Cond'", "Python function"]),
    ("keras", lambda c: _op_layer(c, "Exp").update(class_name="WhileLoop", registered_name="WhileLoop"),
     ["'WhileLoop'", "Python function"]),
    ("keras", lambda c: _op_layer(c, "Exp").update(module="keras.src.ops.core"), ["'Exp'", "not one of Keras"]),
    # an HDF5 config names operations without their module: the allow-list goes by name, callables still out
    ("h5", lambda c: _op_layer(c, "Exp").update(class_name="WhileLoop"), ["'WhileLoop'", "outside Keras"]),
    ("h5", lambda c: _op_layer(c, "Exp").update(class_name="Cond"), ["'Cond'", "outside Keras"]),
    # the names jacli gives the operations it maps are its own, never taken from a file
    ("h5", lambda c: _op_layer(c, "Exp").update(class_name="jacli.ops>Exp"), ["'jacli.ops>Exp'", "outside Keras"]),
])
def test_keras_ops_operations_outside_the_allow_list_are_refused(jacli, keras_ops_model, keras_ops_h5, tmp_path,
                                                                  fmt, edit, words):
    path = tmp_path / f"edited.{fmt}"
    edited = evil.keras_with_config if fmt == "keras" else evil.h5_with_config
    edited(keras_ops_model if fmt == "keras" else keras_ops_h5, path, edit)
    assert_refused(jacli("inspect", path), *words)


def test_keras_config_that_cannot_be_read_is_refused(jacli, tmp_path):
    import h5py

    shutil.copy(SAMPLES / "mlp.h5", tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "a") as f:
        f.attrs["model_config"] = b"{not json"
    assert_one_error(jacli("inspect", tmp_path / "m.h5"), "not valid JSON")
    # trusted, unchecked: Keras's own reason, as one error line (the .h5 mend leaves such a config alone)
    assert_one_error(jacli("inspect", tmp_path / "m.h5", "--trust-model"), "cannot load Keras model")
    with h5py.File(tmp_path / "m.h5", "a") as f:
        del f.attrs["model_config"]
    assert_one_error(jacli("inspect", tmp_path / "m.h5"), "no model_config")
    assert_one_error(jacli("inspect", tmp_path / "m.h5", "--trust-model"), "cannot load Keras model")
    with zipfile.ZipFile(SAMPLES / "mlp.keras") as src, zipfile.ZipFile(tmp_path / "m.keras", "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info) if info.filename != "config.json" else b"\xff\xfe")
        dst.writestr("code.py", b"print(1)")
    assert_one_error(jacli("inspect", tmp_path / "m.keras"), "'code.py', which is not part of a .keras archive")


def test_keras_weights_that_read_other_files_are_refused(jacli, tmp_path):
    import h5py

    (tmp_path / "secret.bin").write_bytes(np.ones(4, np.float32).tobytes())
    shutil.copy(SAMPLES / "mlp.h5", tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "a") as f:
        f["model_weights/evil"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/")
    assert_refused(jacli("inspect", tmp_path / "m.h5"), "model_weights/evil links to another file")
    with zipfile.ZipFile(SAMPLES / "mlp.keras") as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    weights = tmp_path / "w.h5"
    weights.write_bytes(members["model.weights.h5"])
    with h5py.File(weights, "a") as f:
        f.create_dataset("stolen", shape=(4,), dtype="<f4", external=[(str(tmp_path / "secret.bin"), 0, 16)])
    members["model.weights.h5"] = weights.read_bytes()
    with zipfile.ZipFile(tmp_path / "m.keras", "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    assert_refused(jacli("inspect", tmp_path / "m.keras"), "stolen keeps its data in other files")


# --- 2: TorchScript operators are allow-listed --------------------------------------------
def test_torchscript_torch_save_refused_and_live(jacli, d, marker):
    path = d / "saver.pt"
    evil.torchscript_torch_save(path, str(marker))
    assert_refused(jacli("compute", path, d / "x3.npy", "--json"), "torch.save", "writes files")
    assert not marker.exists()
    assert jacli("compute", "--trust-model", path, d / "x3.npy", "--json").code == 0
    assert marker.exists()


@pytest.mark.parametrize("new, words", [
    (b"ops.prim.Print(x)\n    return torch.linear", ["prim::Print"]),
    (b"ops.profiler._record_function_enter(\"a\")\n    return torch.linear", ["profiler::_record_function_enter"]),
    (b"_0 = torch.save\n    _0(x, \"f\")\n    return torch.linear", ["calls _0"]),
    (b"getattr(torch, \"save\")(x, \"f\")\n    return torch.linear", ["getattr()"]),
    (b"x.numpy()\n    return torch.linear", [".numpy()"]),
    (b"return (lambda: 0)() + torch.linear", ["Lambda"]),
    (b"return torch.linear(((", ["not TorchScript jacli can read"]),
    (b"_0 = 1 \\\n    return torch.linear", ["not TorchScript jacli can read"]),  # a backslash continuation
    (b"return torch.linear  # a comment", ["not TorchScript jacli can read"]),
    (b"_0 = r'a'\n    return torch.linear", ["not TorchScript jacli can read"]),  # a raw string
    (b"_1 = __torch__.torch.classes.dist_c10d.ProcessGroup\n    return torch.linear", ["TorchBind class"]),
])
def test_torchscript_code_outside_the_allow_list_is_refused(jacli, tmp_path, new, words):
    path = tmp_path / "edited.pt"
    evil.torchscript_with_code(SAMPLES / "mlp.pt", path, b"return torch.linear", new)
    assert_refused(jacli("inspect", path), *words)


def test_torchscript_check_passes_real_scripted_architectures(tmp_path):
    """LSTM, GRU, a transformer layer, attention, pooling and batch norm, scripted: their
    code passes the allow-list (every call is an operator, a builtin or the archive's own)."""
    import torch

    modules = [torch.nn.LSTM(3, 4, batch_first=True), torch.nn.GRU(3, 4),
               torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), torch.nn.MultiheadAttention(8, 2),
               torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.MaxPool2d(2),
                                   torch.nn.Dropout(), torch.nn.Flatten()), torch.nn.EmbeddingBag(10, 3)]
    for module in modules:
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(module.eval()), buffer)
        assert torch_checks.torchscript_problems("m.pt", buffer.getvalue()) == [], type(module).__name__


# --- 3 and 4: SavedModels: what TensorFlow runs, against an allow-list -----------------------
def test_savedmodel_with_two_serving_defaults_refused_and_live(jacli, d, marker):
    path = evil.savedmodel_two_serving_defaults(d, str(marker))
    assert_refused(jacli("compute", path, d / "x3.npy", "--json"), "two children named 'serving_default'")
    assert not marker.exists()
    assert jacli("compute", "--trust-model", path, d / "x3.npy", "--json").code == 0
    assert marker.exists()  # TensorFlow kept the last one


@pytest.fixture(scope="module")
def tf1_trick(d):
    return evil.savedmodel_tf1_save_tensor_trick(d, str(d / "MARKER"))


def test_tf1_savedmodel_save_tensor_trick_refused_and_live(jacli, d, tf1_trick, marker):
    path = tf1_trick
    assert_refused(jacli("compute", path, d / "x3.npy", "--json"), "WriteFile", "TF1")
    assert not marker.exists()
    jacli("compute", "--trust-model", path, d / "x3.npy", "--json")
    assert marker.exists()


@pytest.mark.parametrize("collection", ["legacy_init_op", "table_initializer", "__saved_model_init_op"])
def test_tf1_init_ops_wherever_the_loader_finds_them(jacli, d, tf1_trick, marker, tmp_path, collection):
    """The writing main op moved to the other places the TF1 loader takes init ops from."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = tmp_path / "m"
    shutil.copytree(tf1_trick, path)
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((path / "saved_model.pb").read_bytes())
    meta = sm.meta_graphs[0]
    (main_op,) = meta.collection_def["saved_model_main_op"].node_list.value
    del meta.collection_def["saved_model_main_op"]
    meta.saver_def.save_tensor_name = meta.saver_def.filename_tensor_name  # any tensor will do
    if collection.startswith("__"):
        meta.signature_def[collection].outputs["init"].name = main_op
    else:
        meta.collection_def[collection].node_list.value.append(main_op)
    (path / "saved_model.pb").write_bytes(sm.SerializeToString())
    assert_refused(jacli("compute", path, d / "x3.npy", "--json"), "WriteFile", "TF1")
    assert not marker.exists()
    if collection == "legacy_init_op":
        r = jacli("compute", "--trust-model", path, d / "x3.npy", "--json")
        assert marker.exists(), r.stderr


def test_savedmodel_check_passes_a_real_architecture(jacli, tmp_path):
    """Convolution, batch norm, pooling, an LSTM (a While loop over TensorLists) and layer
    norm, exported by Keras 3: the allow-list admits all it runs (tf_keras SavedModels are
    among the sample models)."""
    import keras

    x = keras.Input((8, 8, 3))
    y = keras.layers.MaxPooling2D()(keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(x)))
    y = keras.layers.LayerNormalization()(keras.layers.LSTM(5)(keras.layers.Reshape((9, 4))(y)))
    keras.Model(x, keras.layers.Dense(2, activation="softmax")(y)).export(str(tmp_path / "k3"), verbose=False)
    r = jacli("inspect", tmp_path / "k3", "--json")
    assert r.code == 0, r.stderr


def test_savedmodel_op_allow_list():
    allowed = savedmodel_checks.allowed_ops()
    assert {"MatMul", "Conv2D", "FusedBatchNormV3", "ReadVariableOp", "StatefulPartitionedCall", "While",
            "TensorListReserve", "Einsum", "ResizeBilinear"} <= allowed
    assert not {"WriteFile", "ReadFile", "MatchingFiles", "ImmutableConst", "RemoteCall", "Abort", "PrintV2",
                "EagerPyFunc",
                "SaveV2", "RestoreV2", "XlaCallModule", "DecodeProtoV2", "CreateSummaryFileWriter"} & allowed


# --- 6: one read, regular files -------------------------------------------------------------
def test_torchscript_and_keras_and_savedmodel_load_the_bytes_they_checked(d, marker, monkeypatch, tmp_path):
    """The file is swapped for a payload right after the check: what loads is what was checked."""
    import jacli.backends as backends

    path = tmp_path / "swapped.pt"
    shutil.copy(SAMPLES / "map2d.pt", path)
    evil_pt = tmp_path / "evil.pt"
    evil.torchscript_torch_save(evil_pt, str(marker))
    real_ts = torch_checks.torchscript_problems

    def ts_then_swap(p, data):
        problems = real_ts(p, data)
        shutil.copy(evil_pt, path)
        return problems

    monkeypatch.setattr(torch_checks, "torchscript_problems", ts_then_swap)
    model = backends.load(str(path))
    xy = np.array([[1.0, 2.0]], np.float32)
    model.bind({"x": xy})
    assert next(iter(model.forward({"x": xy}).values())).shape == (1, 2) and not marker.exists()

    lambdas = evil.keras_lambdas(tmp_path, str(marker))
    path = tmp_path / "swapped.keras"
    shutil.copy(SAMPLES / "mlp.keras", path)
    real_keras = keras_checks.keras_problems

    def keras_then_swap(p, data, route):
        problems = real_keras(p, data, route)
        shutil.copy(lambdas["keras"], path)
        return problems

    monkeypatch.setattr(keras_checks, "keras_problems", keras_then_swap)
    assert backends.load(str(path)).input_names() == ["x"] and not marker.exists()

    writer = evil.savedmodels(tmp_path, str(marker))["WritesOnLoad"]
    path = tmp_path / "swapped_savedmodel"
    shutil.copytree(SAMPLES / "map2d_savedmodel", path)
    real_sm = savedmodel_checks.savedmodel_problems

    def sm_then_swap(p, saved_model):
        problems = real_sm(p, saved_model)
        shutil.rmtree(path)
        shutil.copytree(writer, path)
        return problems

    monkeypatch.setattr(savedmodel_checks, "savedmodel_problems", sm_then_swap)
    assert backends.load(str(path)).input_names() == ["xy"] and not marker.exists()


def test_model_and_input_paths_must_be_regular_files(jacli, d, tmp_path):
    (tmp_path / "zero.onnx").symlink_to("/dev/zero")
    assert_one_error(jacli("inspect", tmp_path / "zero.onnx"), "not a regular file")
    os.mkfifo(tmp_path / "fifo.pt")
    assert_one_error(jacli("inspect", tmp_path / "fifo.pt"), "not a regular file")  # no hang on open
    os.mkfifo(tmp_path / "fifo.npy")
    assert_one_error(jacli("compute", SAMPLES / "map2d.onnx", tmp_path / "fifo.npy"), "not a regular file")
    shutil.copytree(SAMPLES / "map2d_savedmodel", tmp_path / "m")
    (tmp_path / "secret").write_bytes(b"x")
    (tmp_path / "m" / "assets").mkdir(exist_ok=True)
    (tmp_path / "m" / "assets" / "link").symlink_to(tmp_path / "secret")
    assert_one_error(jacli("inspect", tmp_path / "m"), "symbolic link to a file outside")


def test_onnx_external_data_must_be_a_regular_file(jacli, tmp_path):
    os.mkfifo(tmp_path / "w.bin")
    evil.onnx_matmul(tmp_path / "m.onnx", external_location="w.bin")
    assert_refused(jacli("inspect", tmp_path / "m.onnx"), "not a regular file")  # no hang reading a FIFO


# --- 7: bounded reads -----------------------------------------------------------------------
def _zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_zip_bombs_and_duplicate_members_are_refused_before_inflating(jacli, tmp_path, monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda: 64 << 20)  # a 32 MiB limit
    big = b" " * (48 << 20)  # inflates to 48 MiB, stored in ~50 KiB
    with zipfile.ZipFile(SAMPLES / "mlp.keras") as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    bombs = {
        "config.keras": _zip(tmp_path / "config.keras", {**members, "config.json": big}),
        "code.pt": _zip(tmp_path / "code.pt", {"m/code/__torch__.py": big, "m/data.pkl": b""}),
        "x.npz": _zip(tmp_path / "x.npz", {"a.npy": b"\x93NUMPY" + big}),
    }
    for name, path in bombs.items():
        assert path.stat().st_size < 1 << 20
        tracemalloc.start()
        r = jacli("compute", SAMPLES / "map2d.onnx", path) if name.endswith("npz") else jacli("inspect", path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert_one_error(r, "zip bomb", "64.0 MiB available")
        assert peak < 8 << 20, (name, peak)
    x = io.BytesIO()
    np.save(x, np.zeros((2, 2), np.float32))
    twice = tmp_path / "twice.npz"
    with zipfile.ZipFile(twice, "w") as z:
        z.writestr("xy.npy", x.getvalue())
        z.writestr("xy.npy", x.getvalue())
    assert_one_error(jacli("compute", SAMPLES / "map2d.onnx", twice), "two members named 'xy.npy'")


def test_h5_input_linking_to_another_file_is_refused(jacli, tmp_path):
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["xy"] = np.ones((2, 2), np.float32)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["xy"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/xy")
    assert_one_error(jacli("compute", SAMPLES / "map2d.onnx", tmp_path / "x.h5"), "links to another file")


def test_read_limit_can_be_set(jacli, monkeypatch):
    monkeypatch.setenv("JACLI_READ_LIMIT", "64K")
    assert_one_error(jacli("inspect", SAMPLES / "mlp.onnx"), "JACLI_READ_LIMIT limit of 64.0 KiB")
    monkeypatch.setenv("JACLI_READ_LIMIT", "lots")
    assert_one_error(jacli("inspect", SAMPLES / "mlp.onnx"), "not a size")
    monkeypatch.setenv("JACLI_READ_LIMIT", "1G")
    assert jacli("inspect", SAMPLES / "mlp.onnx").code == 0


def test_stdin_is_read_exactly_as_declared(jacli):
    x = io.BytesIO()
    np.save(x, np.array([[1.0, 2.0]], np.float32))
    good = x.getvalue()
    r = jacli("compute", SAMPLES / "map2d.onnx", "-", "-o", "-", stdin=good)
    assert r.code == 0 and np.load(io.BytesIO(r.stdout)).shape == (1, 2, 2)
    assert_one_error(jacli("compute", SAMPLES / "map2d.onnx", "-", stdin=good + b"\0" * 8), "bytes after the array")
    assert_one_error(jacli("compute", SAMPLES / "map2d.onnx", "-", stdin=good[:-3]), "truncated")
    header = good[:good.index(b"\n") + 1].replace(b"(1, 2)", b"(9999999999999, 2)")
    assert_one_error(jacli("compute", SAMPLES / "map2d.onnx", "-", stdin=header), "would need")


# --- 8: outputs ----------------------------------------------------------------------------
def _parts(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".part"))


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".h5"])
def test_disk_full_is_one_error_line_and_nothing_left(jacli, tmp_path, monkeypatch, suffix):
    from jacli.io import writers

    out = tmp_path / f"j{suffix}"
    out.write_bytes(OLD)
    write = {".npy": writers.RawNpy, ".npz": writers.RawNpy, ".h5": writers.H5Writer}[suffix]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(write, "write", full)
    r = jacli("compute", SAMPLES / "mlp.onnx", "--random", "50", "-o", out, "-q")
    assert_one_error(r, "No space left on device", str(out))
    assert out.read_bytes() == OLD and _parts(tmp_path) == []


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".h5"])
def test_file_size_limit_mid_write_in_a_real_process(tmp_path, suffix):
    """RLIMIT_FSIZE makes real writes fail (EFBIG) part way, in h5py's native code too."""
    out = tmp_path / f"j{suffix}"
    out.write_bytes(OLD)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    proc = subprocess.run([sys.executable, "-m", "jacli", "compute", str(SAMPLES / "mlp.onnx"), "--random", "20",
                           "-o", str(out), "-q"], capture_output=True, preexec_fn=limit, timeout=120)
    lines = error_lines(proc.stderr.decode())
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: cannot write"), lines
    assert out.read_bytes() == OLD and _parts(tmp_path) == []


def test_stdout_output_into_a_closed_pipe_or_closed_stdout(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((2000, 500), np.float32))
    cmd = [sys.executable, "-m", "jacli", "compute", str(SAMPLES / "mlp.onnx"), str(tmp_path / "x.npy"), "-o", "-"]
    read, write = os.pipe()
    os.close(read)  # nobody reads: like `| head` that has already exited
    proc = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, timeout=120)
    os.close(write)
    lines = error_lines(proc.stderr.decode())
    assert proc.returncode == 2 and lines == ["Error: cannot write to stdout: Broken pipe"], proc.stderr.decode()
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, timeout=120, preexec_fn=lambda: os.close(1))
    lines = error_lines(proc.stderr.decode())
    assert proc.returncode == 2 and lines == ["Error: cannot write to stdout: it is closed"], proc.stderr.decode()


def test_output_naming_the_model_or_the_input_is_refused(jacli, tmp_path):
    model, x = tmp_path / "m.npy", tmp_path / "x.npy"  # a TorchScript archive, named as an output could be
    shutil.copy(SAMPLES / "map2d.pt", model)
    np.save(x, np.ones((2, 2), np.float32))
    (tmp_path / "link.npy").symlink_to(x)
    before = model.read_bytes(), x.read_bytes()
    for out in (x, tmp_path / "link.npy", model):
        assert_one_error(jacli("compute", model, x, "-o", out), "refusing to write", "model or an input file")
    assert (model.read_bytes(), x.read_bytes()) == before
    shutil.copytree(SAMPLES / "map2d_savedmodel", tmp_path / "sm")
    inside = tmp_path / "sm" / "assets" / "notes.npy"
    inside.parent.mkdir(exist_ok=True)
    inside.write_bytes(OLD)  # a file of the SavedModel directory
    assert_one_error(jacli("compute", tmp_path / "sm", x, "-o", inside), "refusing to write")
    assert inside.read_bytes() == OLD


def test_outputs_get_the_umask_or_the_replaced_files_mode(jacli, tmp_path):
    old = os.umask(0o027)
    try:
        for suffix in (".npy", ".npz", ".h5"):
            out = tmp_path / f"new{suffix}"
            assert jacli("compute", SAMPLES / "map2d.onnx", SAMPLES / "map2d_input.npy", "-o", out, "-q").code == 0
            assert out.stat().st_mode & 0o777 == 0o640, suffix
        out = tmp_path / "kept.npy"
        out.write_bytes(OLD)
        out.chmod(0o604)
        assert jacli("compute", SAMPLES / "map2d.onnx", SAMPLES / "map2d_input.npy", "-o", out, "-q").code == 0
        assert out.stat().st_mode & 0o777 == 0o604
    finally:
        os.umask(old)


@pytest.mark.parametrize("value", ["0", "512K", "1000000"])
def test_max_memory_below_one_mib_is_refused(jacli, value):
    assert_one_error(jacli("compute", SAMPLES / "map2d.onnx", SAMPLES / "map2d_input.npy", "--max-memory", value),
                     "less than 1 MiB")
