"""LSTM, GRU and RNN: decomposed over their time steps, differentiated in both modes with
respect to every float input, on the ONNX node tests' cases and on attribute combinations
they do not cover; end to end on torch.onnx exports against torch autograd in float64."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper as oh

from onnx_cases import case_model, check_decomposition, check_model, keras_via_tf2onnx, node_cases, session  # noqa: E402

CASES = {**node_cases("lstm", "LSTM"), **node_cases("gru", "GRU"), **node_cases("rnn", "RNN")}
RNG = np.random.default_rng(11)


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_node_cases(name):
    node, inputs, opsets, outputs = CASES[name]
    model, feeds = case_model(node, inputs, 22, opsets)
    batchwise = any(a.name == "layout" and a.i for a in node.attribute)  # onnxruntime has no kernel for it
    check_decomposition(model, feeds, [o for o, n in zip(outputs, node.output) if n] if batchwise else None)
    check_model(model, feeds)


def _recurrent(op, steps=3, batch=2, features=3, hidden=2, layout=0, seq=False, states=False, peep=False,
               bias=True, **attrs):
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    r = lambda *s: RNG.standard_normal(s).astype(np.float32) * 0.7  # noqa: E731
    x = r(batch, steps, features) if layout else r(steps, batch, features)
    inputs = {"X": x, "W": r(dirs, gates * hidden, features), "R": r(dirs, gates * hidden, hidden),
              "B": r(dirs, 2 * gates * hidden) if bias else None,
              "sequence_lens": RNG.integers(1, steps + 1, batch).astype(np.int32) if seq else None}
    state = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
    inputs["initial_h"] = r(*state) if states else None
    if op == "LSTM":
        inputs["initial_c"] = r(*state) if states else None
        inputs["P"] = r(dirs, 3 * hidden) if peep else None
    names = [k if v is not None else "" for k, v in inputs.items()]
    while names and not names[-1]:
        names.pop()
    outs = ["Y", "Y_h", "Y_c"][: 3 if op == "LSTM" else 2]
    node = oh.make_node(op, names, outs, hidden_size=hidden, layout=layout, **attrs)
    return case_model(node, [inputs[k] if k else None for k in names], 22)


COMBOS = [
    ("LSTM", dict(layout=1, seq=True, states=True, peep=True)),
    ("LSTM", dict(direction="bidirectional", seq=True, states=True, clip=1.5)),
    ("LSTM", dict(direction="reverse", input_forget=1, peep=True, states=True)),
    ("LSTM", dict(activations=["HardSigmoid", "LeakyRelu", "Softsign"], activation_alpha=[0.3, 0.05],
                  activation_beta=[0.6], states=True)),
    ("LSTM", dict(direction="bidirectional", activations=["Sigmoid", "Affine", "ScaledTanh", "Sigmoid", "Tanh", "Elu"],
                  activation_alpha=[0.8, 1.2, 0.9], activation_beta=[0.1, 0.7], layout=1, states=True)),
    ("GRU", dict(linear_before_reset=1, seq=True, states=True, layout=1)),
    ("GRU", dict(direction="bidirectional", linear_before_reset=1, clip=1.5, seq=True)),
    ("GRU", dict(direction="reverse", seq=True, states=True, bias=False)),
    ("GRU", dict(activations=["Softplus", "ThresholdedRelu"], activation_alpha=[0.2], states=True)),
    ("RNN", dict(direction="bidirectional", activations=["Relu", "Sigmoid"], seq=True, states=True, layout=1)),
    ("RNN", dict(direction="reverse", clip=1.2, seq=True, states=True)),
]


@pytest.mark.parametrize("op, kw", COMBOS, ids=[f"{op}-{i}" for i, (op, _) in enumerate(COMBOS)])
def test_attribute_combinations(op, kw):
    model, feeds = _recurrent(op, **kw)
    expected = None
    if kw.get("layout"):  # onnxruntime runs only layout 0: the same network with time first
        twin, twin_feeds = _recurrent(op, **{**kw, "layout": 0})
        twin_feeds = {k: (v.transpose(1, 0, 2) if k in ("X", "initial_h", "initial_c") else feeds[k])
                      for k, v in feeds.items()}
        ys = session(twin).run(None, twin_feeds)
        expected = [ys[0].transpose(2, 0, 1, 3)] + [y.transpose(1, 0, 2) for y in ys[1:]]
    check_decomposition(model, feeds, expected)
    check_model(model, feeds)


# --- end to end: real exports against the framework's own autograd in float64 ----------
class _TorchRecurrent:
    """A 2-layer bidirectional LSTM into a GRU, the shape of a typical sequence encoder."""

    @staticmethod
    def build():
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lstm = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=True)
                self.gru = torch.nn.GRU(8, 3, batch_first=True)

            def forward(self, x):
                y, _ = self.lstm(x)
                z, h = self.gru(y)
                return z.sum(1) + h[0]

        torch.manual_seed(0)
        return Net().eval()


def test_torch_lstm_gru_export_matches_torch_autograd(tmp_path):
    import torch
    from jacli import api

    net = _TorchRecurrent.build()
    path = tmp_path / "rnn.onnx"
    torch.onnx.export(net, (torch.randn(2, 5, 3),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    model = api.load(str(path))
    assert {"LSTM", "GRU"} <= {n.op_type for n in model.proto.graph.node}
    xs = RNG.standard_normal((3, 5, 3)).astype(np.float32)  # another batch size than exported
    net64 = net.double()
    ref = np.stack([torch.autograd.functional.jacobian(lambda v: net64(v[None])[0], torch.tensor(s, dtype=torch.float64))
                    .numpy() for s in xs])
    for mode in ("forward", "reverse"):
        J = api.jacobian(model, xs, mode=mode)
        np.testing.assert_allclose(J, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_keras_lstm_through_tf2onnx_matches_tensorflow(tmp_path):
    import onnx
    import tensorflow as tf
    from jacli import api

    def net(dtype):
        inp = tf.keras.Input((6, 3), dtype=dtype)
        x = tf.keras.layers.LSTM(4, return_sequences=True, dtype=dtype)(inp)
        x = tf.keras.layers.LSTM(3, dtype=dtype)(x)
        return tf.keras.Model(inp, tf.keras.layers.Dense(2, dtype=dtype)(x))

    xs = RNG.standard_normal((2, 6, 3)).astype(np.float32)
    proto, ref = keras_via_tf2onnx(net, xs, seed=3)
    assert sum(n.op_type == "LSTM" for n in proto.graph.node) == 2  # tf2onnx fuses each Keras LSTM into one op
    onnx.save(proto, tmp_path / "k.onnx")
    model = api.load(str(tmp_path / "k.onnx"))
    for mode in ("forward", "reverse"):
        np.testing.assert_allclose(api.jacobian(model, xs, mode=mode), ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_dynamic_sequence_length_is_refused_naming_the_node():
    from jacli.backends.onnx.derive import build_vjp
    from jacli.errors import UnsupportedError

    node = oh.make_node("RNN", ["x", "W", "R"], ["", "h"], hidden_size=2, name="rnn")
    model, _ = case_model(node, [np.zeros((3, 1, 2), np.float32), np.zeros((1, 2, 2), np.float32),
                                 np.zeros((1, 2, 2), np.float32)], 17)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "T"
    with pytest.raises(UnsupportedError, match=r"'RNN' \(node 'rnn'\).*sequence length known only at run time"):
        build_vjp(model, ["x"], ["h"])


def test_float64_evaluation_of_a_recurrent_model_uses_the_decomposition(tmp_path):
    """onnxruntime has no double LSTM/GRU kernel: jacli's float64 graph (for check and
    --method fd) is the decomposition's, so finite differences run in float64."""
    import onnx

    from jacli import api

    model, feeds = _recurrent("LSTM", direction="bidirectional", states=True, peep=True)
    onnx.save(model, tmp_path / "lstm.onnx")
    m = api.load(str(tmp_path / "lstm.onnx"))
    y64 = m.forward64(feeds)
    assert y64["Y"].dtype == np.float64
    np.testing.assert_allclose(y64["Y"], m.forward(feeds)["Y"], atol=1e-5)
    ad = api.jacobian(m, feeds, wrt="X", of="Y_h", batch=False)
    fd = api.jacobian(m, feeds, wrt="X", of="Y_h", batch=False, method="fd")
    np.testing.assert_allclose(fd, ad, rtol=1e-5, atol=1e-6)  # float32 differences would miss this by far


def test_dynamic_sequence_length_gets_a_graph_per_input_length(tmp_path):
    """A torch export with a dynamic time axis: the derivative graph is built for the
    sequence length of the input at hand (once per length), the batch axis stays dynamic."""
    import torch
    from jacli import api

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = torch.nn.GRU(3, 2, batch_first=True)

        def forward(self, x):
            return self.gru(x)[0]

    torch.manual_seed(1)
    net = Net().eval()
    path = tmp_path / "gru.onnx"
    torch.onnx.export(net, (torch.randn(2, 4, 3),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}})
    model = api.load(str(path))
    assert model.inputs[0].shape[1] is None
    net64 = net.double()
    for steps in (3, 6):
        xs = RNG.standard_normal((2, steps, 3)).astype(np.float32)
        ref = np.stack([torch.autograd.functional.jacobian(lambda v: net64(v[None])[0], torch.tensor(
            s, dtype=torch.float64)).numpy() for s in xs])
        for mode in ("forward", "reverse"):
            J = api.jacobian(model, xs, mode=mode)
            np.testing.assert_allclose(J, ref, rtol=1e-4, atol=1e-6)
    assert sum(len(key) == 4 and isinstance(key[3], tuple) for key in model._graphs) == 4  # (vjp, jvp) x two lengths
    assert api.check(model, xs).passed  # finite differences in float32 (no double GRU kernel), not an error


def test_dynamic_time_major_sequence_with_no_batch(tmp_path):
    """A time-major export (X: time, batch, features) with both axes dynamic: with --no-batch
    the graph is built for the whole input's shape."""
    import torch
    from jacli import api

    torch.manual_seed(2)
    net = torch.nn.RNN(2, 3).eval()
    path = tmp_path / "rnn.onnx"
    torch.onnx.export(net, (torch.randn(4, 1, 2),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y", "h"], dynamic_axes={"x": {0: "t", 1: "b"}, "y": {0: "t", 1: "b"}})
    model = api.load(str(path))
    xs = RNG.standard_normal((5, 2, 2)).astype(np.float32)
    ref = torch.autograd.functional.jacobian(lambda v: net.double()(v)[0], torch.tensor(xs, dtype=torch.float64))
    J = api.jacobian(model, xs, of="y", batch=False, mode="reverse")
    np.testing.assert_allclose(J, ref.numpy(), rtol=1e-4, atol=1e-6)
