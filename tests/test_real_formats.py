"""Real architectures in the formats people save them in, each Jacobian compared with the
framework's own float64 autodiff on the same weights (tests/corpus_keras.py,
tests/corpus_transformers.py); and what jacli says where a format cannot answer."""
from __future__ import annotations

import json

import numpy as np
import pytest

import jacli
from conftest import run_jacli as run
from jacli.errors import ModelLoadError

RECURRENT = ("lstm", "gru", "bilstm")
KERAS_FORMATS = {
    "lstm": ("keras", "h5", "export", "tfsave", "tfk"),
    "gru": ("keras", "export", "tfk"),
    "bilstm": ("keras", "export", "tfsave"),
    "attention": ("keras", "export"),
    "embedding": ("keras", "h5", "export"),
    "two_io": ("keras", "h5", "export", "tfsave"),
    "custom": ("keras", "h5"),
    "mobilenet": ("keras",),
}


def _close(J, ref):
    """float32 model against the float64 reference."""
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(J, ref, rtol=2e-4, atol=2e-5 * scale)


# --- Keras and SavedModel ----------------------------------------------------------------
@pytest.fixture(scope="module")
def keras_corpus(tmp_path_factory):
    """name -> (Keras model, inputs, float64 reference, {format: saved path}), built once."""
    import corpus_keras as ck

    directory, built = tmp_path_factory.mktemp("keras"), {}

    def get(name):
        if name not in built:
            model = ck.BUILDERS[name]()
            xs = ck.inputs(model, 2)
            built[name] = (model, xs, ck.reference(name, model, xs),
                           {fmt: ck.save(name, model, fmt, directory) for fmt in KERAS_FORMATS[name]})
        return built[name]

    return get


def _keras_pairs(model, loaded, J):
    import corpus_keras as ck

    if not isinstance(J, dict):  # one pair: the float output by the float input
        (out,), (inp,) = [[s.name for s in specs if s.is_float] for specs in (loaded.outputs, loaded.inputs)]
        J = {f"d{out}/d{inp}": J}
    for key, value in J.items():
        out, inp = key[1:].split("/d", 1)
        yield (ck.output_index(model, out), ck.input_index(model, inp)), value


@pytest.mark.parametrize("name, fmt", [(n, f) for n, fmts in KERAS_FORMATS.items() for f in fmts])
def test_keras_formats_match_tensorflow_float64(keras_corpus, name, fmt):
    import corpus_keras as ck

    model, xs, ref, paths = keras_corpus(name)
    loaded = jacli.load(paths[fmt], custom_objects=[ck.CUSTOM_LAYERS] if name == "custom" else ())
    # MobileNetV2: one cotangent per call, so that the test does not pay for tracing a vectorised map
    modes = ("reverse", "forward") if name in RECURRENT + ("attention",) else ("reverse",)
    for mode in modes:
        J = jacli.jacobian(loaded, xs, mode=mode, chunk_size=1 if name == "mobilenet" else None)
        pairs = dict(_keras_pairs(model, loaded, J))
        assert sorted(pairs) == sorted(ref), (mode, sorted(pairs))  # every float input, every output
        for key, value in pairs.items():
            _close(value, ref[key])


def test_recurrent_savedmodel_compute_check_svd(keras_corpus, tmp_path):
    """The commands the issue found failing on a Keras 3 export of an LSTM."""
    model, xs, ref, paths = keras_corpus("lstm")
    np.save(tmp_path / "x.npy", xs["a"])
    for args in (["compute", "-o", tmp_path / "J.npy", "--mode", "forward"], ["check", "--fd", "--json"],
                 ["svd", "--json"]):
        r = run(args[0], paths["export"], tmp_path / "x.npy", *args[1:], "-q")
        assert r.code == 0, r.stderr
    _close(np.load(tmp_path / "J.npy"), ref[0, 0])
    assert json.loads(r.out)["samples"][0]["condition_number"] > 1


def test_h5_that_neither_keras_reads_shows_keras3_reason_first(keras_corpus, tmp_path):
    """Keras 3 writes MultiHeadAttention to .h5 but cannot read it back; tf_keras fails too."""
    import corpus_keras as ck

    model, _, _, _ = keras_corpus("attention")
    path = ck.save("attention", model, "h5", tmp_path)
    r = run("inspect", path)
    assert r.code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "Keras 3: too many positional arguments" in r.stderr
    assert r.stderr.index("Keras 3:") < r.stderr.index("tf_keras:")


def test_custom_layer_is_named_and_supplied_by_custom_objects(keras_corpus, tmp_path, monkeypatch):
    import corpus_keras as ck

    import keras

    model, xs, ref, paths = keras_corpus("custom")
    np.save(tmp_path / "x.npy", xs["a"])
    # as in a fresh process: the class is not registered until its module is imported
    monkeypatch.delitem(keras.saving.get_custom_objects(), "jacli_tests>ScaledSoftsign")
    for extra in ([], ["--trust-model"]):  # refused by the check; or Keras cannot find the class
        r = run("compute", paths["keras"], tmp_path / "x.npy", *extra)
        assert r.code == 2 and "'ScaledSoftsign'" in r.stderr and "--custom-objects" in r.stderr, r.stderr
    r = run("compute", paths["keras"], tmp_path / "x.npy", "--custom-objects", ck.CUSTOM_LAYERS,
            "-o", tmp_path / "J.npy", "-q")
    assert r.code == 0, r.stderr
    _close(np.load(tmp_path / "J.npy"), ref[0, 0])
    broken = tmp_path / "broken_layers.py"
    broken.write_text("import no_such_dependency\n")
    with pytest.raises(ModelLoadError, match="importing it failed: .*No module named 'no_such_dependency'"):
        jacli.load(paths["keras"], custom_objects=[broken])


def test_embedding_ids_stay_integer(keras_corpus):
    model, xs, ref, paths = keras_corpus("embedding")
    for fmt in ("keras", "export"):
        loaded = jacli.load(paths[fmt])
        assert {s.name: s.dtype for s in loaded.inputs} == {"a_ids": "int32", "b_feats": "float32"}
