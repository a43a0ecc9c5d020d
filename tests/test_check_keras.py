"""`jacli check` on TensorFlow SavedModels with finite differences in float64 (the inlined
signature retyped, jacli/backends/tf_float64.py), and on Keras applications (weights=None,
tests/corpus_keras.py) as .keras and SavedModel: correct models pass every entry, the
float64 evaluation is float64 (against Keras's own float64 rebuild and numpy), and a
gradient 1% off on a few entries (a tf.custom_gradient saved with the model) is caught at
the default settings; a graph the rewrite cannot retype differences in float32, with a note."""
from __future__ import annotations

import json

import numpy as np
import pytest

import corpus_keras as ck
import jacli
from conftest import run_jacli

@pytest.fixture(scope="session")
def apps(tmp_path_factory):
    """name -> (Keras model, one input, {format: path}), built and saved once."""
    root, cache = tmp_path_factory.mktemp("keras_apps"), {}

    def get(name):
        if name not in cache:
            model = ck.application(name)
            paths = {"keras": root / f"{name}.keras", "savedmodel": root / f"{name}_savedmodel"}
            model.save(paths["keras"])
            model.export(str(paths["savedmodel"]), verbose=False)
            x = np.random.default_rng(0).standard_normal((1, *model.inputs[0].shape[1:])).astype(np.float32)
            cache[name] = (model, x, paths)
        return cache[name]

    return get


@pytest.fixture
def one_strategy(monkeypatch):
    """VJP rows by k backward passes after one forward pass: what is tested is the check,
    and the tuner's trial of pfor traces for 10-20 s on an application's graph."""
    monkeypatch.setenv("JACLI_STRATEGY", "sequential")


def _reference(model, x):
    """J (1, 2, *in) by GradientTape on the application rebuilt in float64, same weights."""
    import tensorflow as tf

    from jacli.backends.tf import _float64_keras

    twin = _float64_keras(model)
    xt = tf.constant(x.astype(np.float64))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        y = twin(xt, training=False)
        rows = [y[:, j] for j in range(y.shape[1])]
    return np.stack([tape.gradient(r, xt).numpy() for r in rows], axis=1)


# .keras FD was float64 before SavedModel's was: MobileNetV2 as a SavedModel only (test time)
@pytest.mark.parametrize("name,fmt", [("mobilenet_v3_small", "keras"), ("mobilenet_v3_small", "savedmodel"),
                                      ("mobilenet_v2", "savedmodel")])
def test_keras_application_passes_every_entry_with_fd_in_float64(apps, one_strategy, name, fmt):
    model, x, paths = apps(name)
    loaded = jacli.load(str(paths[fmt]))
    doc = jacli.check(loaded, x).to_json()
    assert doc["passed"], (doc["mismatches"][:3], doc["notes"])
    assert doc["fd_dtype"] == "float64" and doc["notes"] == [] and doc["rtol"] == 2e-3
    assert doc["checked"] == 2 * 32 * 32 and doc["kinks"] == 0 and doc["fd_noise"] == 0
    ref = _reference(model, x)
    np.testing.assert_allclose(jacli.jacobian(loaded, x, mode="reverse"), ref, atol=2e-5 * np.abs(ref).max())
    if fmt == "savedmodel":  # its signature inlined: jacli's graphs hold its ops, not a call of it
        from jacli.backends.tf import CALL_OPS, _operations

        assert loaded.not_inlined is None
        assert not {op.type for g in loaded._graphs.values() for op in _operations(g.graph)} & set(CALL_OPS)


def test_savedmodel_float64_evaluation_is_float64(apps):
    """The retyped graph computes what Keras's float64 rebuild of the same layers does, to
    float64 rounding (the rebuild given the float32 epsilons the SavedModel stores), and
    what the float32 model does to ~1e-6."""
    from jacli.backends.tf import _retype

    model, _, paths = apps("mobilenet_v2")
    saved = jacli.load(str(paths["savedmodel"]))
    x = np.random.default_rng(1).standard_normal((3, 32, 32, 1)).astype(np.float32)
    xs = {saved.inputs[0].name: x}
    (y64,), (y32,) = (list(ys.values()) for ys in (saved.forward64(xs), saved.forward(xs)))
    twin = model.__class__.from_config(_retype(_epsilons_in_float32(model.get_config())))
    twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
    ref = twin(x.astype(np.float64), training=False).numpy()
    assert y64.dtype == np.float64 and y32.dtype == np.float32
    scale = np.abs(ref).max()
    assert np.abs(y64 - ref).max() < 1e-13 * scale
    assert 1e-9 * scale < np.abs(y32 - ref).max() < 1e-5 * scale


def _epsilons_in_float32(config):
    if isinstance(config, list):
        return [_epsilons_in_float32(v) for v in config]
    if isinstance(config, dict):
        return {k: float(np.float32(v)) if k == "epsilon" else _epsilons_in_float32(v) for k, v in config.items()}
    return config


# --- planted bugs in SavedModels, caught at the default settings ---------------------------
@pytest.fixture(scope="session")
def custom_gradients(tmp_path_factory):
    """A Dense-tanh net (4 -> 5) saved with a custom gradient 1.01x too large on outputs 1
    and 3, and with a correct one (1x)."""
    import keras

    root = tmp_path_factory.mktemp("custom_gradients")
    keras.utils.set_random_seed(3)
    x = keras.Input((4,), name="x")
    net = keras.Model(x, keras.layers.Dense(5, activation="tanh")(keras.layers.Dense(6, activation="tanh")(x)))
    return net, {f: ck.save_with_custom_gradient(net, root / f"scaled_{f}", f, rows=(1, 3)) for f in (1.01, 1.0)}


def test_one_percent_wrong_custom_gradient_in_a_savedmodel_is_caught(custom_gradients, tmp_path):
    _, custom_gradients = custom_gradients
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32))
    r = run_jacli("check", custom_gradients[1.01], tmp_path / "x.npy", "--fd", "--json")
    doc = json.loads(r.out)
    assert r.code == 1 and doc["fd_dtype"] == "float64" and doc["rtol"] == 2e-3 and doc["notes"] == []
    rows = {(e["sample"], *e["output_index"]) for e in doc["mismatches"]}
    assert rows == {(s, o) for s in range(2) for o in (1, 3)}, rows
    assert {e["diagnosis"] for e in doc["mismatches"]} == {"wrong-gradient"}
    for e in doc["mismatches"]:
        assert e["ad"] / e["fd"] == pytest.approx(1.01, abs=1e-4)
    r = run_jacli("check", custom_gradients[1.01], tmp_path / "x.npy", "--fd")
    assert r.code == 1 and "FAILED" in r.out and "against central differences in float64" in r.out, r.out
    r = run_jacli("check", custom_gradients[1.0], tmp_path / "x.npy", "--fd", "--json")
    doc = json.loads(r.out)
    assert r.code == 0 and doc["passed"] and doc["fd_dtype"] == "float64" and doc["worst"]["ratio"] < 0.2


def test_method_fd_on_a_savedmodel_differences_in_float64(custom_gradients):
    """--method fd of a SavedModel against GradientTape on the Keras net rebuilt in float64:
    agreement to the float32 rounding of the result, far below float32 differences' ~1e-3;
    also once the signature has been differentiated (TensorFlow then appends intermediates
    to its outputs)."""
    net, paths = custom_gradients
    x = np.random.default_rng(4).standard_normal((3, 4)).astype(np.float32)
    ref = _reference(net, x)
    model = jacli.load(str(paths[1.0]))
    np.testing.assert_allclose(jacli.jacobian(model, x), ref, atol=1e-6 * np.abs(ref).max())
    J = jacli.jacobian(model, x, method="fd")
    np.testing.assert_allclose(J, ref, rtol=0, atol=2e-7 * np.abs(ref).max())


def test_one_percent_wrong_gradient_in_a_keras_application_is_caught(apps, one_strategy, tmp_path):
    model, x, _ = apps("mobilenet_v3_small")
    path = ck.save_with_custom_gradient(model, tmp_path / "planted", 1.01, rows=(1,))
    doc = jacli.check(jacli.load(str(path)), x).to_json()
    assert not doc["passed"] and doc["fd_dtype"] == "float64"
    assert {(e["sample"], *e["output_index"]) for e in doc["mismatches"]} == {(0, 1)}
    assert {e["diagnosis"] for e in doc["mismatches"]} == {"wrong-gradient"} and doc["failures"] > 20


# --- the rewrite: batch normalization as arithmetic, and what it cannot retype -------------
def _save(tmp_path, name, fn, shape):
    import tensorflow as tf

    module = tf.Module()
    call = tf.function(lambda x: {"y": fn(x)}, input_signature=[tf.TensorSpec((None, *shape), tf.float32, name="x")])
    tf.saved_model.save(module, str(tmp_path / name), signatures={"serving_default": call})
    return tmp_path / name


def test_fused_batch_norm_becomes_allow_listed_arithmetic(tmp_path):
    """FusedBatchNormV3 (tf_keras's BatchNormalization) has no float64 kernel: in either
    layout it is written as x·k + b in allow-listed operations, and equals numpy in float64."""
    import tensorflow as tf

    from jacli.backends import tf_float64
    from jacli.backends.savedmodel_checks import allowed_ops

    rng = np.random.default_rng(0)
    scale, offset, mean, var = (rng.uniform(0.5, 2, 3).astype(np.float32) for _ in range(4))

    def both(x):  # NHWC, then the same on NCHW
        a = tf.compat.v1.nn.fused_batch_norm(x, scale, offset, mean, var, epsilon=1e-3, is_training=False)[0]
        nchw = tf.transpose(x, (0, 3, 1, 2))
        b = tf.compat.v1.nn.fused_batch_norm(nchw, scale, offset, mean, var, epsilon=1e-3, is_training=False,
                                             data_format="NCHW")[0]
        return tf.tanh(a) + tf.transpose(b, (0, 2, 3, 1)) ** 2

    path = _save(tmp_path, "bn", both, (4, 5, 3))
    model = jacli.load(str(path))
    x = rng.standard_normal((2, 4, 5, 3)).astype(np.float32)
    bn = (x.astype(np.float64) - mean) / np.sqrt(var.astype(np.float64) + np.float64(np.float32(1e-3))) * scale + offset
    y64 = model.forward64({"x": x})["y"]
    assert y64.dtype == np.float64
    np.testing.assert_allclose(y64, np.tanh(bn) + bn ** 2, rtol=1e-13)
    graph = tf_float64.retype(tf, _inlined(model))
    ops = {n.op for n in graph.node}
    assert not ops & set(tf_float64._BATCH_NORMS) and ops <= allowed_ops()
    assert set(tf_float64.EMITTED) <= allowed_ops()
    doc = jacli.check(model, x).to_json()
    assert doc["passed"] and doc["fd_dtype"] == "float64", doc["notes"]


def _inlined(model):
    graph = model.fn.graph_def  # the signature with its functions inlined (tf_inline.py)
    assert any(n.op == "FusedBatchNormV3" for n in graph.node)
    return graph


W = np.random.default_rng(1).standard_normal((24, 3)).astype(np.float32) / 4
UNRETYPED = {  # name -> (the model's function of x (2, 2, 6), what the note names)
    "lrn": (lambda tf, x: tf.nn.local_response_normalization(x, 2), "(LRN) has no float64 form"),
    "float16": (lambda tf, x: tf.cast(tf.sin(tf.cast(x, tf.float16)), tf.float32) + x, "computes in float16"),
}


@pytest.mark.parametrize("name", UNRETYPED)
def test_a_graph_the_rewrite_cannot_retype_falls_back_to_float32_with_a_note(tmp_path, name):
    """LRN has no float64 form in TensorFlow, and a float16 part would stay float16: FD runs
    in float32 (rtol 1e-2), the note says why, and the correct model passes."""
    import tensorflow as tf

    fn, why = UNRETYPED[name]
    path = _save(tmp_path, name, lambda x: tf.tanh(tf.reshape(fn(tf, x), (-1, 24)) @ W), (2, 2, 6))
    model = jacli.load(str(path))
    doc = jacli.check(model, np.random.default_rng(2).standard_normal((2, 2, 2, 6)).astype(np.float32)).to_json()
    assert doc["passed"] and doc["fd_dtype"] == "float32" and doc["rtol"] == 1e-2
    (note,) = doc["notes"]
    assert why in note and "finite differences run in float32" in note, note
