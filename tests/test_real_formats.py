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
APPLICATIONS = ("mobilenet", "mobilenet_v3", "convnext")  # one cotangent per call: no vectorised map traced
KERAS_FORMATS = {
    "lstm": ("keras", "h5", "export", "tfsave", "tfk"),
    "gru": ("keras", "export", "tfk"),
    "bilstm": ("keras", "export", "tfsave"),
    "attention": ("keras", "h5", "export"),
    "embedding": ("keras", "h5", "export"),
    "two_io": ("keras", "h5", "export", "tfsave"),
    "custom": ("keras", "h5"),
    "mobilenet": ("keras",),
    "convnet": ("keras", "export"),
    # .h5 written by Keras 3, which Keras 3 itself cannot read back (jacli mends the config: hdf5_objects)
    "mobilenet_v3": ("keras", "h5", "export"),
    "convnext": ("keras", "h5", "export"),
    "scaled_sum": ("keras", "h5"),
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
    # the applications: one cotangent per call, so that the test does not pay for tracing a vectorised map
    modes = ("reverse", "forward") if name in RECURRENT + ("attention",) else ("reverse",)
    for mode in modes:
        J = jacli.jacobian(loaded, xs, mode=mode, chunk_size=1 if name in APPLICATIONS else None)
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


def test_check_passes_keras3_h5_with_operations_in_float64(keras_corpus, monkeypatch):
    """MobileNetV3Small's .h5 (its hard-sigmoid mapped back to keras.ops operations): the
    float64 rebuild that finite differences run is built from the mended model."""
    monkeypatch.setenv("JACLI_STRATEGY", "sequential")  # the check is tested, not the tuner's trial of pfor
    _, xs, _, paths = keras_corpus("mobilenet_v3")
    doc = jacli.check(jacli.load(paths["h5"]), {k: v[:1] for k, v in xs.items()}).to_json()
    assert doc["passed"] and doc["fd_dtype"] == "float64" and doc["notes"] == [], (doc["mismatches"][:3], doc["notes"])
    assert doc["checked"] == 4 * 32 * 32 * 3 and doc["kinks"] == 0


def test_h5_that_neither_keras_reads_shows_keras3_reason_first(keras_corpus, tmp_path):
    """A Keras 3 .h5 whose layer config neither Keras 3 nor tf_keras accepts: Keras 3's
    reason first (the file is Keras 3's)."""
    import _security_models as files

    _, _, _, paths = keras_corpus("attention")
    path = tmp_path / "edited.h5"
    files.h5_with_config(paths["h5"], path, lambda c: next(
        layer for layer in c["config"]["layers"] if layer["class_name"] == "LayerNormalization")["config"].update(
        no_such_argument=1))
    r = run("inspect", path)
    assert r.code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "Keras 3: " in r.stderr and "no_such_argument" in r.stderr
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


# --- transformers and a timm-style ViT (torch) ---------------------------------------------------
@pytest.fixture(scope="module")
def torch_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("torch")


@pytest.fixture(scope="module")
def transformers_models():
    import corpus_transformers as ct

    return {"bert": ct.bert(), "gpt2": ct.gpt2()}


@pytest.mark.parametrize("how", ["traced", "export"])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_transformers_embeds_match_torch_float64(transformers_models, torch_dir, arch, how):
    import corpus_transformers as ct
    import torch

    module = ct.Embeds(transformers_models[arch])
    x = np.random.default_rng(1).standard_normal((2, ct.SEQ, ct.HIDDEN)).astype(np.float32)
    path = ct.save(module, (torch.from_numpy(x),), how, torch_dir / f"{arch}_embeds_{how}")
    J = jacli.jacobian(jacli.load(path), x, mode="reverse")  # SDPA on CPU has no forward-mode rule
    _close(J, ct.reference(module, x))


@pytest.mark.parametrize("how", ["traced", "export"])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_transformers_on_token_ids_keep_them_integer(transformers_models, torch_dir, tmp_path, arch, how):
    import corpus_transformers as ct
    import torch

    ids = np.random.default_rng(2).integers(0, ct.VOCAB, (2, ct.SEQ))
    path = ct.save(ct.Ids(transformers_models[arch]), (torch.from_numpy(ids),), how, torch_dir / f"{arch}_ids_{how}")
    doc = json.loads(run("inspect", path, "--json").out)
    assert [(s["name"], s["dtype"]) for s in doc["inputs"]] == [("input_ids", "int64")]
    np.save(tmp_path / "ids.npy", ids)
    r = run("compute", path, tmp_path / "ids.npy")
    assert r.code == 2 and r.stderr == "Error: the model has no floating-point input to differentiate\n", r.stderr
    hidden = jacli.load(path).forward({"input_ids": ids})
    with torch.no_grad():
        want = transformers_models[arch](input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(next(iter(hidden.values())), want, rtol=1e-5, atol=1e-6)  # ids used as given


def test_pt2_with_transformers_dataclass_outputs_loads(transformers_models, torch_dir):
    """BertModel exported as it is: its ModelOutput is registered with torch's pytree only
    while transformers is imported; jacli reads it as a dict of its fields."""
    import corpus_transformers as ct
    import torch

    bert = transformers_models["bert"]
    x = np.random.default_rng(3).standard_normal((2, ct.SEQ, ct.HIDDEN)).astype(np.float32)
    path = torch_dir / "bert_model.pt2"
    torch.export.save(torch.export.export(bert, (), {"inputs_embeds": torch.from_numpy(x)}), path)
    import torch.utils._pytree as pytree

    name = "transformers.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions"
    registered = pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.pop(name)  # as in a process without transformers
    try:
        model = jacli.load(path)
    finally:
        pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE[name] = registered
    assert model.output_names() == ["last_hidden_state", "pooler_output"]
    J = jacli.jacobian(model, {"inputs_embeds": x}, of="last_hidden_state", mode="reverse")
    _close(J, ct.reference(ct.Embeds(bert), x))


@pytest.fixture(scope="module")
def vit_files(torch_dir):
    import corpus_transformers as ct
    import torch

    module = ct.vit()
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    paths = {how: ct.save(module, (torch.from_numpy(x),), how, torch_dir / f"vit_{how}")
             for how in ("scripted", "traced", "export")}
    return paths, x, ct.reference(module, x)


@pytest.mark.parametrize("how", ["scripted", "traced", "export"])
def test_vit_with_optional_arguments(vit_files, how):
    """forward(x, attn_mask: Optional[Tensor] = None, is_causal: bool = False): one input."""
    paths, x, ref = vit_files
    doc = json.loads(run("inspect", paths[how], "--json").out)
    assert [s["name"] for s in doc["inputs"]] == ["x"]
    if how == "scripted":  # the optional ones are listed, and left at their defaults
        assert [(a["name"], a["default"]) for a in doc["optional_arguments"]] == [("attn_mask", "None"),
                                                                                  ("is_causal", "False")]
    _close(jacli.jacobian(jacli.load(paths[how]), x, mode="reverse"), ref)


def test_an_array_for_an_optional_argument_or_no_input_is_refused(vit_files, tmp_path):
    """An array that no input takes would be ignored without a word: a value for
    ``attn_mask`` (left at its default) or a misspelt name is exit 2, and nothing is written."""
    paths, x, _ = vit_files
    for extra, says in (("attn_mask", "'attn_mask', an argument of forward with a default (None)"),
                        ("X", "array(s) 'X' that the model does not take (its inputs: x)")):
        np.savez(tmp_path / "in.npz", x=x, **{extra: np.zeros((2, 17, 17), np.float32)})
        r = run("compute", paths["scripted"], tmp_path / "in.npz", "-o", tmp_path / "J.npy")
        assert r.code == 2 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not (tmp_path / "J.npy").exists()


def test_required_non_tensor_argument_is_named(torch_dir):
    import torch

    class Scaled(torch.nn.Module):
        def forward(self, x, factor: int):
            return x * factor

    path = torch_dir / "scaled.pt"
    torch.jit.save(torch.jit.script(Scaled()), path)
    with pytest.raises(ModelLoadError, match="argument 'factor' is int and has no default"):
        jacli.load(path)


class _RNNWithState:
    """A traced GRU whose initial state is made in float32 (explicit dtype and a tensor
    constant): the float64 copy must retype both."""

    @staticmethod
    def build():
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.gru = torch.nn.GRU(3, 4, batch_first=True)

            def forward(self, x):
                h0 = torch.zeros(1, x.shape[0], 4, dtype=torch.float32) + torch.tensor([0.5, -0.2, 0.1, 0.3])
                return self.gru(x, h0)[0] * torch.ones(4, dtype=torch.float32)

        torch.manual_seed(0)
        return Net().eval()


def test_traced_rnn_with_float32_state_runs_in_float64(torch_dir):
    import torch

    net = _RNNWithState.build()
    x = np.random.default_rng(5).standard_normal((2, 5, 3)).astype(np.float32)
    path = torch_dir / "gru_state.pt"
    torch.jit.save(torch.jit.trace(net, torch.from_numpy(x)), path)
    model = jacli.load(path)
    got = model.forward64({"x": x})["output"]
    with torch.no_grad():
        h0 = torch.zeros(1, 2, 4, dtype=torch.float64) + torch.tensor([0.5, -0.2, 0.1, 0.3]).double()  # its values
        want = net.gru.double()(torch.from_numpy(x.astype(np.float64)), h0)[0].numpy()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    result = jacli.check(model, x)
    assert result.passed and result.to_json()["fd_dtype"] == "float64"
    np.testing.assert_allclose(model.forward({"x": x})["output"], want, rtol=1e-5, atol=1e-6)  # the original: float32


# --- determinants of ill-conditioned and singular Jacobians -----------------------------------------
def _gru_jacobians(scale: float, seed: int, path):
    """A traced 2-layer GRU on (6, 8) sequences: a 48×48 Jacobian per sample; its float64
    Jacobians from torch's autograd on a float64 copy."""
    import copy

    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(8, 8, num_layers=2, batch_first=True)

        def forward(self, x):
            return self.gru(x)[0]

    torch.manual_seed(seed)
    net = Net().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    x = torch.randn(3, 6, 8)
    torch.jit.save(torch.jit.trace(net, x), path)
    net64 = copy.deepcopy(net).double()
    J64 = np.stack([torch.autograd.functional.jacobian(lambda v: net64(v[None])[0], xi).reshape(48, 48).numpy()
                    for xi in x.double()])
    return x.numpy(), J64


def test_det_of_an_ill_conditioned_gru_is_finite_and_agrees_with_svd(torch_dir):
    """The issue's case: a GRU's Jacobian with κ₂ of 1e4..1e5 at float32 has a meaningful
    log|det J| (LU or SVD of jacli's own float32 Jacobian matches the float64 reference)."""
    x, J64 = _gru_jacobians(2.0, 0, torch_dir / "gru2.pt")
    model = jacli.load(torch_dir / "gru2.pt")
    d, s = jacli.det(model, x), jacli.svd(model, x)
    sign, want = np.linalg.slogdet(J64)
    kappa = np.linalg.cond(J64)
    assert kappa.max() > 1e4  # ill-conditioned at float32: more than half its digits
    assert not d.singular.any() and d.ill_conditioned.all() and np.isfinite(d.logabsdet).all()
    np.testing.assert_array_equal(d.sign, sign)
    error = np.abs(d.logabsdet - want)
    assert np.all(error <= d.logabsdet_error), (error, d.logabsdet_error)  # the estimate bounds the error
    assert np.all(d.logabsdet_error < 1e-2)
    np.testing.assert_allclose(d.condition_number, s.condition_number, rtol=1e-9)  # the two commands agree
    np.testing.assert_allclose(d.condition_number, kappa, rtol=1e-2)
    assert (s.rank == 48).all()
    np.save(torch_dir / "gru_x.npy", x[:1])
    doc = json.loads(run("det", torch_dir / "gru2.pt", torch_dir / "gru_x.npy", "--json").out)
    sample = doc["samples"][0]
    assert sample["ill_conditioned"] is True and sample["singular"] is False and sample["logabsdet_error"] > 0
    assert {"sign", "logabsdet", "det"} <= set(sample) and doc["summary"]["ill_conditioned"] == 1


def test_det_singular_only_where_svd_finds_the_rank_deficient(torch_dir):
    import torch

    rng = np.random.default_rng(6)
    W = rng.standard_normal((6, 6)) @ np.diag([3, 2, 1, 0.5, 1e-3, 0]) @ rng.standard_normal((6, 6))
    layer = torch.nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(W))
    x = rng.standard_normal((2, 6)).astype(np.float32)
    torch.jit.save(torch.jit.trace(layer, torch.from_numpy(x)), torch_dir / "rank5.pt")
    model = jacli.load(torch_dir / "rank5.pt")
    d, s = jacli.det(model, x), jacli.svd(model, x)
    assert d.singular.all() and (d.sign == 0).all() and np.isneginf(d.logabsdet).all()
    assert (s.rank == 5).all() and np.isinf(s.condition_number).all() and np.isinf(d.condition_number).all()
    # the same map without its zero singular value: finite, with the float64 value inside the estimate
    W[:, :] = rng.standard_normal((6, 6)) @ np.diag([3, 2, 1, 0.5, 1e-3, 1e-4]) @ rng.standard_normal((6, 6))
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(W))
    torch.jit.save(torch.jit.trace(layer, torch.from_numpy(x)), torch_dir / "rank6.pt")
    d = jacli.det(jacli.load(torch_dir / "rank6.pt"), x)
    want = np.linalg.slogdet(W.astype(np.float32).astype(np.float64))[1]
    assert not d.singular.any() and np.all(np.abs(d.logabsdet - want) <= d.logabsdet_error)


def test_a_vectorised_map_that_fails_falls_back_to_an_exact_one(keras_corpus, monkeypatch):
    """pfor cannot vectorise the gradient of a loaded LSTM loop (jacli folds loop models
    instead); where pfor fails on a model, the k seeds are taken one after another."""
    from jacli.backends import tf as tf_backend

    model, xs, ref, paths = keras_corpus("lstm")
    monkeypatch.setattr(tf_backend.TFModel, "_has_loops", lambda self: False)
    loaded = jacli.load(paths["export"])
    for mode in ("reverse", "forward"):
        _close(jacli.jacobian(loaded, xs, mode=mode), ref[0, 0])
    # pfor cannot take the loop's gradient; a SavedModel's JVPs go by forward-mode AD first,
    # which it vectorises (the result is checked above)
    assert loaded._unmappable == {("vjp", "vectorised")}


@pytest.mark.parametrize("name, fmt", [("convnet", "keras"), ("convnet", "export"), ("attention", "export"),
                                       ("two_io", "h5")])
def test_xla_compiled_maps_match_tensorflow_float64(keras_corpus, name, fmt, monkeypatch):
    """The VJP map compiled by XLA (the strategy a long loop moves to, pinned here): MobileNetV3's
    blocks (depthwise convolutions, batch norms, hard-swish, squeeze-excite) as .keras and as an
    inlined SavedModel, a transformer's attention half, two inputs and two outputs."""
    from jacli.engine import strategies

    model, xs, ref, paths = keras_corpus(name)
    loaded = jacli.load(paths[fmt])
    monkeypatch.setenv(strategies.PIN, "xla")
    pairs = dict(_keras_pairs(model, loaded, jacli.jacobian(loaded, xs, mode="reverse")))
    assert loaded._compiled and not loaded._unmappable  # compiled, not fallen back to another map
    assert sorted(pairs) == sorted(ref)
    for key, value in pairs.items():
        _close(value, ref[key])


def test_a_model_xla_cannot_compile_falls_back_to_a_map_it_can(keras_corpus, monkeypatch):
    """A loaded LSTM's loop (with jacli's fold for loops turned off): pfor cannot vectorise its
    gradient, with or without XLA; the call goes on with the exact sequential map, and the
    next call is not offered XLA again."""
    from jacli.backends import tf as tf_backend
    from jacli.engine import strategies

    model, xs, ref, paths = keras_corpus("lstm")
    monkeypatch.setattr(tf_backend.TFModel, "_has_loops", lambda self: False)
    loaded = jacli.load(paths["export"])
    monkeypatch.setenv(strategies.PIN, "xla")
    _close(jacli.jacobian(loaded, xs, mode="reverse"), ref[0, 0])
    assert ("vjp", "xla") in loaded._unmappable and not loaded._compiled
    assert "xla" not in loaded._map_strategies(loaded._vjp)
    monkeypatch.delenv(strategies.PIN)
    _close(jacli.jacobian(loaded, xs, mode="reverse"), ref[0, 0])
