"""A SavedModel's serving signature inlined into jacli's graphs (jacli/backends/tf_inline.py):
its own operations, not a call of the signature; the weights held once, by the loaded
variables (no frozen copy as constants, in the graphs or in the float64 copy); loops kept
as loops; only allow-listed operations imported from an untrusted model; and the call of
the signature where inlining fails, with the right Jacobian either way."""
from __future__ import annotations

import numpy as np
import pytest

import corpus_keras as ck
import jacli
from jacli.backends.tf import _operations

CALLS = {"PartitionedCall", "StatefulPartitionedCall"}
BIG = 64  # no constant of the model's graphs holds more elements than this: the weights are variables


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (path of its Keras 3 export, inputs, float64 reference), built once."""
    directory, built = tmp_path_factory.mktemp("inline"), {}

    def get(name):
        if name not in built:
            model = ck.BUILDERS[name]()
            xs = ck.inputs(model, 2)
            built[name] = (ck.save(name, model, "export", directory), xs, ck.reference(name, model, xs)[0, 0],
                           len(model.weights))
        return built[name]

    return get


def _ops(graphs):
    return [op for g in graphs for op in _operations(g)]


@pytest.mark.parametrize("name", ["convnet", "lstm"])
def test_jacli_graphs_hold_the_signatures_ops_and_read_its_variables(saved, name):
    path, xs, want, weights = saved(name)
    model = jacli.load(str(path))
    assert model.not_inlined is None
    for mode in ("reverse", "forward"):
        np.testing.assert_allclose(jacli.jacobian(model, xs, mode=mode), want, atol=2e-5 * np.abs(want).max(),
                                   err_msg=mode)
    graphs = [g.graph for g in model._graphs.values()]
    ops = _ops(graphs)
    assert not {op.type for op in ops} & CALLS  # the signature's operations, not a call of it
    assert ("While" in {op.type for op in ops}) is (name == "lstm")  # a loop stays a loop
    assert max(op.outputs[0].shape.num_elements() or 0 for op in ops if op.type == "Const") <= BIG
    # every graph reads the weights through the loaded variables' handles, one capture each
    variables = {id(v.handle) for v in model.inlined.variables}
    for g in graphs:
        captured = [id(value) for value, _ in g.captures if id(value) in variables]
        assert len(captured) == len(set(captured)) == weights


def test_the_float64_copy_reads_float64_twins_of_the_variables(saved):
    import tensorflow as tf

    path, xs, _, weights = saved("convnet")
    model = jacli.load(str(path))
    y, y64 = model.forward(xs), model.forward64(xs)
    graph = model._fn64  # the float64 copy: a concrete function
    twins = graph.float64_variables
    assert len(twins) == weights and all(v.dtype == tf.float64 for v in twins)
    consts = [op for op in _operations(graph.graph) if op.type == "Const"]
    assert max(op.outputs[0].shape.num_elements() or 0 for op in consts) <= BIG  # not frozen in
    assert not {op.type for op in _operations(graph.graph)} & CALLS
    (k,) = y
    assert y64[k].dtype == np.float64
    np.testing.assert_allclose(y64[k], y[k], rtol=1e-5, atol=1e-6)


def test_where_grappler_fails_the_signature_is_called_and_the_check_differences_in_float32(
        saved, monkeypatch):
    from tensorflow.python.framework import convert_to_constants

    def fails(*args, **kwargs):
        raise RuntimeError("grappler failed")

    path, xs, want, _ = saved("convnet")
    monkeypatch.setattr(convert_to_constants, "_run_inline_graph_optimization", fails)
    model = jacli.load(str(path))
    assert "Grappler cannot inline the signature: grappler failed" in model.not_inlined
    for mode in ("reverse", "forward"):
        np.testing.assert_allclose(jacli.jacobian(model, xs, mode=mode), want, atol=2e-5 * np.abs(want).max())
    assert model._calls_functions() and model._tangent_route is False  # forward mode through the call
    doc = jacli.check(model, xs["a"][:1]).to_json()
    assert doc["passed"] and doc["fd_dtype"] == "float32", doc["notes"]
    assert "no float64 copy of this SavedModel: Grappler cannot inline" in doc["notes"][0]


def test_a_signature_with_a_saved_custom_gradient_is_called_and_its_float64_copy_inlined(tmp_path):
    """The custom gradient is a function bound to the signature's own graph: jacli calls the
    signature (its gradient 1.01x on two outputs is what the check must see), and the float64
    finite differences come from the inlined copy."""
    model = ck.BUILDERS["convnet"]()
    path = ck.save_with_custom_gradient(model, tmp_path / "planted", 1.01, rows=(1, 3))
    loaded = jacli.load(str(path))
    assert "custom gradients saved with it" in loaded.not_inlined and loaded.inlined is not None
    doc = jacli.check(loaded, ck.inputs(model, 1)["a"]).to_json()
    assert not doc["passed"] and doc["fd_dtype"] == "float64" and doc["notes"] == []
    assert {e["output_index"][0] for e in doc["mismatches"]} == {1, 3}


def test_an_untrusted_signature_is_inlined_only_of_allow_listed_operations():
    import tensorflow as tf

    from jacli.backends.tf_inline import NotInlined, inline

    spec = tf.TensorSpec((None, 3), tf.float32, name="x")
    python = tf.function(lambda x: {"y": tf.py_function(np.sin, [x], tf.float32)}).get_concrete_function(spec)
    with pytest.raises(NotInlined, match=r"outside the allow-list: EagerPyFunc \(runs Python code\)"):
        inline(tf, python, trust=False)
    assert {n.op for n in inline(tf, python, trust=True).graph_def.node} >= {"EagerPyFunc"}
    plain = tf.function(lambda x: {"y": tf.sin(x)}).get_concrete_function(spec)
    assert "Sin" in {n.op for n in inline(tf, plain, trust=False).graph_def.node}
