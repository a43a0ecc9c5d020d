"""The ONNX backend holds a model's large weights once (jacli/backends/onnx/wire.py): the
graphs it parses, checks, derives, caches and runs take them as inputs fed from the file's
bytes, with the same Jacobians as the weights embedded; what the file reader does not move
is judged by onnx and onnxruntime as before."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import jacli
from conftest import run_jacli
from jacli.backends.onnx import wire
from jacli.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _small_models_move_too(monkeypatch):
    """The models here are small: their weights are moved whatever they hold in all
    (wire.MOVED_TOTAL; the subprocess runs on a 100 MB model keep the real threshold)."""
    monkeypatch.setattr(wire, "MOVED_TOTAL", 0)


def mlp(sizes=(300, 1000, 7), seed=0, ir=8, listed=False, extra=()) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """x -> tanh(x W1 + b1) W2 + b2 ...: (model, [W1, b1, W2, b2, ...]). W1 (1.2 MB by
    default) is over wire.MOVED_BYTES, the biases far under it; ``listed`` makes every
    initializer a graph input too (IR 3 style); ``extra``: more initializers."""
    rng = np.random.default_rng(seed)
    nodes, inits, values, h = [], [], [], "x"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = rng.standard_normal(b).astype(np.float32) * 0.1
        values += [w, bias]
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(bias, f"b{i}")]
        nodes += [helper.make_node("MatMul", [h, f"W{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        h = f"a{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Tanh", [h], [f"t{i}"]))
            h = f"t{i}"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    inits += list(extra)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])]
    if listed:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "mlp", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", sizes[-1]])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13 if ir >= 7 else 9)])
    model.ir_version = ir
    return model, values


def reference(values, x):
    """The MLP's Jacobian (B, out, in) in float64, in closed form."""
    ws = [v.astype(np.float64) for v in values]
    h, jac = x.astype(np.float64), None
    for i in range(0, len(ws), 2):
        z = h @ ws[i] + ws[i + 1]
        layer = np.broadcast_to(ws[i].T, (len(x), *ws[i].T.shape))
        jac = layer if jac is None else layer @ jac
        if i + 2 < len(ws):
            h = np.tanh(z)
            jac = (1 - h ** 2)[:, :, None] * jac
    return jac


def save(model, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def test_the_large_float_initializers_become_inputs_fed_from_the_file(tmp_path):
    big_ints = numpy_helper.from_array(np.arange(200_000, dtype=np.int64), "ids")  # 1.6 MB, not a weight
    model, values = mlp(extra=[big_ints])
    data = model.SerializeToString()
    skeleton, moved = wire.split(data)
    assert [w.name for w in moved] == ["W0"] and len(skeleton) < len(data) - values[0].nbytes + 100
    graph = onnx.load_model_from_string(skeleton).graph
    assert sorted(t.name for t in graph.initializer) == ["W1", "b0", "b1", "ids"]
    (vi,) = [v for v in graph.input if v.name == "W0"]
    assert vi.type.tensor_type.elem_type == TensorProto.FLOAT
    assert [d.dim_value for d in vi.type.tensor_type.shape.dim] == [300, 1000]
    array = moved[0].array(data)
    assert np.array_equal(array, values[0]) and not array.flags.owndata and not array.flags.writeable
    onnx.checker.check_model(skeleton)


def test_ir3_initializers_move_only_when_listed_and_stay_listed_once(tmp_path):
    model, _ = mlp(ir=3, listed=True)
    skeleton, moved = wire.split(model.SerializeToString())
    assert [(w.name, w.listed) for w in moved] == [("W0", True)]
    assert [v.name for v in onnx.load_model_from_string(skeleton).graph.input].count("W0") == 1
    m = jacli.load(str(save(model, tmp_path / "ir3.onnx")))
    assert [s.name for s in m.inputs] == ["x"]
    assert "W0" in {t.name for t in m.proto.graph.initializer} and "W0" in {v.name for v in m.proto.graph.input}
    unlisted, _ = mlp(ir=3)  # IR 3 initializers must be inputs: the checker's verdict, not this reader's
    assert wire.split(unlisted.SerializeToString())[1] == []


@pytest.mark.parametrize("damage, message", [
    ("short", "too small"),  # raw_data 4 bytes short of dims x itemsize
    ("twice", "W0"),  # two initializers of one name
])
def test_what_the_reader_does_not_move_is_judged_as_before(tmp_path, damage, message):
    model, _ = mlp()
    init = model.graph.initializer
    if damage == "short":
        init[0].raw_data = init[0].raw_data[:-4]
    else:
        init.append(init[0])
    assert wire.split(model.SerializeToString())[1] == []
    with pytest.raises(ModelLoadError, match=message):
        jacli.load(str(save(model, tmp_path / "bad.onnx")))


def test_cut_or_unwalkable_files_are_left_to_the_parser(tmp_path):
    data = mlp()[0].SerializeToString()
    assert wire.split(data[: len(data) // 2]) is None
    assert wire.split(b"\x0b" + data) is None  # a group: no ONNX message has one
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        jacli.load(str(save_bytes(tmp_path / "cut.onnx", data[: len(data) // 2])))


def save_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _meaning(model: onnx.ModelProto) -> tuple:
    """What a model says, initializers and inputs in any order (the reader moves them)."""
    g = model.graph
    inits = {}
    for t in g.initializer:
        rest = TensorProto()
        rest.CopyFrom(t)
        rest.ClearField("raw_data")
        if rest.data_location == TensorProto.DEFAULT:
            rest.ClearField("data_location")
        inits.setdefault(t.name, []).append((t.raw_data, rest.SerializeToString(deterministic=True)))
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    del rest.graph.initializer[:], rest.graph.input[:]
    return rest.SerializeToString(deterministic=True), inits, sorted(v.SerializeToString() for v in g.input)


def _embed(skeleton: bytes, moved, data: bytes) -> onnx.ModelProto:
    model = onnx.load_model_from_string(skeleton)
    fed = {w.name: w for w in moved}
    inputs = [v for v in model.graph.input if v.name not in fed or fed[v.name].listed]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(numpy_helper.from_array(w.array(data), w.name) for w in moved)
    return model


def test_the_skeleton_means_what_the_file_means_under_mutations(monkeypatch):
    """Bytes flipped, dropped, inserted or cut anywhere but inside the moved raw data: the
    reader gives up, or its skeleton parses exactly when the file does, to the same model
    once the weights are put back."""
    monkeypatch.setattr(wire, "MOVED_BYTES", 64)
    data = mlp(sizes=(3, 8, 2))[0].SerializeToString()
    _, moved = wire.split(data)
    assert [w.name for w in moved] == ["W0", "W1"]
    raw = {i for w in moved for i in range(w.offset, w.offset + w.nbytes)}
    spots = [i for i in range(len(data)) if i not in raw]
    rng = np.random.default_rng(5)
    outcomes = {"gave up": 0, "both parse": 0, "neither parses": 0}
    for case in range(400):
        at, kind = int(rng.choice(spots)), case % 4
        byte = bytes([int(rng.integers(256))])
        mutated = [data[:at] + byte + data[at + 1:], data[:at] + data[at + 1:], data[:at] + byte + data[at:],
                   data[:at]][kind]
        found = wire.split(mutated)
        try:
            whole = onnx.load_model_from_string(mutated)
        except Exception:
            whole = None
        if found is None:
            outcomes["gave up"] += 1
            continue
        skeleton, weights = found
        try:
            embedded = _embed(skeleton, weights, mutated)
        except Exception:
            embedded = None
        assert (whole is None) == (embedded is None), (case, at, kind)
        if whole is not None:
            assert _meaning(embedded) == _meaning(whole), (case, at, kind)
        outcomes["both parse" if whole is not None else "neither parses"] += 1
    assert min(outcomes.values()) > 10, outcomes  # every outcome exercised


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_jacobians_with_fed_weights_match_the_closed_form(tmp_path, mode):
    model, values = mlp(sizes=(300, 1000, 1000, 5))
    m = jacli.load(str(save(model, tmp_path / "m.onnx")))
    assert set(m._weights) == {"W0", "W1"}
    x = np.random.default_rng(1).standard_normal((2, 300)).astype(np.float32)
    got = jacli.jacobian(m, x, mode=mode)
    np.testing.assert_allclose(got, reference(values, x), rtol=2e-4, atol=2e-6)
    fd = jacli.jacobian(m, x[:1, :], method="fd")[0]  # the float64 graph, weights cast in it
    np.testing.assert_allclose(fd[:, :40], reference(values, x[:1])[0][:, :40], rtol=1e-5, atol=1e-8)


def conv_gemm() -> tuple[onnx.ModelProto, np.ndarray]:
    """Conv -> Relu -> Flatten -> Gemm (transB, a 4 MB weight): no double Conv kernel in
    onnxruntime, so FD runs in the float64 evaluator."""
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((16, 3, 3, 3)) / 5).astype(np.float32)
    fc = (rng.standard_normal((1000, 16 * 8 * 8)) / 32).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Tanh", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "cg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1000])],
                              initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return model, rng.standard_normal((1, 3, 8, 8)).astype(np.float32)


def lstm() -> tuple[onnx.ModelProto, np.ndarray]:
    """An LSTM whose recurrence weight R (1 MiB) is fed, W (192 KB) embedded."""
    rng = np.random.default_rng(7)
    W = (rng.standard_normal((1, 1024, 48)) / 7).astype(np.float32)
    R = (rng.standard_normal((1, 1024, 256)) / 16).astype(np.float32)
    graph = helper.make_graph([helper.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=256)], "lstm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, "N", 48])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, 1, "N", 256])],
                              initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    return model, rng.standard_normal((3, 1, 48)).astype(np.float32)


@pytest.mark.parametrize("build", [conv_gemm, lstm])
def test_fed_weights_give_the_jacobians_of_embedded_ones(tmp_path, monkeypatch, build):
    model, x = build()
    path = save(model, tmp_path / "m.onnx")
    monkeypatch.setenv("JACLI_CACHE_DIR", "off")
    fed = jacli.load(str(path))
    assert list(fed._weights) == [{conv_gemm: "fc", lstm: "R"}[build]]
    monkeypatch.setattr(wire, "MOVED_BYTES", 1 << 40)
    embedded = jacli.load(str(path))
    assert not embedded._weights
    batch = build is conv_gemm  # the LSTM's leading axis is time
    for mode in ("forward", "reverse"):
        np.testing.assert_allclose(jacli.jacobian(fed, x, mode=mode, batch=batch),
                                   jacli.jacobian(embedded, x, mode=mode, batch=batch), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jacli.jacobian(fed, x, method="fd", batch=batch),
                               jacli.jacobian(embedded, x, method="fd", batch=batch), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_fed_conv_kernels_have_their_adjoints_fed_too(tmp_path, monkeypatch, name):
    """With every conv kernel fed (as in a model over wire.MOVED_TOTAL: Keras' ResNet50 as
    ONNX), the input gradient of each unit-stride Conv (grouped and depthwise ones too) is
    a Conv with the adjoint kernel, fed beside the weight (wire.ADJOINT, computed once), not
    a ConvTranspose; a strided 1x1 one is that Conv with zeros inserted after it (Resize and
    a 0/1 mask), a strided depthwise one on a few output pixels zeros inserted before it, and
    only the other strided ones stay ConvTranspose.
    The Jacobians are torch's float64 ones, and export-grad embeds the adjoints."""
    import corpus_torch

    monkeypatch.setattr(wire, "MOVED_BYTES", 64)
    monkeypatch.setenv("JACLI_CACHE_DIR", "off")
    module, x = corpus_torch.build(name)
    paths, failed = corpus_torch.save_all(module, x, tmp_path, formats=("onnx",))
    m = jacli.load(str(paths["onnx"]))
    convs = [n for n in m.graph.graph.node if n.op_type == "Conv"]
    assert convs and all(n.input[1] in m._weights for n in convs)
    got = jacli.jacobian(m, x.numpy())
    want = corpus_torch.reference_jacobian(module, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()

    def attr(n, key, default):
        return next((list(a.ints) for a in n.attribute if a.name == key), default)

    strided = [n for n in convs if max(attr(n, "strides", [1])) > 1]
    pointwise = [n for n in strided if attr(n, "kernel_shape", None) == [1, 1]]
    assert bool(pointwise) == (name == "resnet18")  # its downsampling shortcuts
    graph = m._derived("vjp", ["x"], ["y"], tiled=True)
    ops = [n.op_type for n in graph.graph.node]
    adjoints = [vi.name for vi in graph.graph.input if vi.name.startswith(wire.ADJOINT)]
    # the strided depthwise ones on at most SPREAD_FIRST output pixels: zeros spread first
    spread = len(strided) - len(pointwise) - ops.count("ConvTranspose")
    assert spread == (2 if name == "mobilenet_v3_small" else 0) and ops.count("ConvTranspose") < len(convs)
    assert ops.count("Resize") == len(pointwise) and ops.count("Pad") >= spread
    assert len(adjoints) == len(convs) - len(strided) + len(pointwise) + spread
    assert all(m._adjoints[a] is m._weight(a) for a in adjoints)  # computed once
    out = tmp_path / "g.onnx"
    jacli.api.export_grad(m, str(out), mode="vjp")
    exported = onnx.load(str(out))
    assert {v.name for v in exported.graph.input} == {"x", "ct:y"}
    assert set(adjoints) <= {t.name for t in exported.graph.initializer}


def test_constants_make_the_named_inputs_initializers_of_external_data():
    """wire.constants, on a graph's bytes without onnx: each input it is given an array for
    becomes an initializer of that type and shape, its data external at the placeholder
    (onnxruntime is handed the arrays), so a session gives what the fed graph gives."""
    import onnxruntime as ort

    model, values = mlp(sizes=(30, 20, 4))
    skeleton = onnx.helper.make_model(model.graph, opset_imports=model.opset_import)
    skeleton.ir_version = 8
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(v.shape)) for n, v in (("W0", values[0]), ("W1", values[2]))]
    kept = [t for t in skeleton.graph.initializer if t.name not in ("W0", "W1")]
    del skeleton.graph.initializer[:]
    skeleton.graph.initializer.extend(kept)
    skeleton.graph.input.extend(inputs)
    data = skeleton.SerializeToString()
    arrays = {"W0": values[0], "W1": values[2].astype(np.float16).astype(np.float32)}
    held, made = wire.constants(data, lambda name: arrays.get(name) if name == "W0" else None)
    assert made == ["W0"]
    graph = onnx.load_model_from_string(held).graph
    assert [v.name for v in graph.input] == ["x", "W1"]
    (w0,) = [t for t in graph.initializer if t.name == "W0"]
    assert (list(w0.dims), w0.data_type, w0.data_location) == ([30, 20], TensorProto.FLOAT, TensorProto.EXTERNAL)
    assert {e.key: e.value for e in w0.external_data} == {"location": wire.PLACEHOLDER} and not w0.raw_data
    x = np.random.default_rng(3).standard_normal((5, 30)).astype(np.float32)
    (fed,) = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x, "W0": values[0], "W1": values[2]})
    opts = ort.SessionOptions()
    opts.add_external_initializers(["W0"], [ort.OrtValue.ortvalue_from_numpy(values[0])])
    (got,) = ort.InferenceSession(held, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x, "W1": values[2]})
    np.testing.assert_allclose(got, fed, rtol=1e-6, atol=1e-7)
    assert wire.constants(data, lambda name: None) == (data, [])
    old = onnx.ModelProto()
    old.CopyFrom(skeleton)
    old.ir_version = 3  # every initializer an input there: nothing to make
    assert wire.constants(old.SerializeToString(), arrays.get)[1] == []
    twice = onnx.ModelProto()
    twice.CopyFrom(skeleton)
    twice.graph.input.append(inputs[0])  # an input listed twice is left to onnxruntime to judge
    assert wire.constants(twice.SerializeToString(), arrays.get)[1] == ["W1"]


def test_the_constant_strategy_holds_fed_weights_only_within_the_budget(tmp_path, monkeypatch):
    """ResNet-18 with every conv kernel fed (as Keras' ResNet50 as ONNX is): the tiled VJP runs
    with the weights fed or held as constants (strategy "constant", pinned here); both give
    torch's float64 Jacobian, the constant session takes no weight as an input and its copies
    count in the model's share of the budget. A budget without room for them offers no
    strategy, builds no such session (even pinned), and still gives the Jacobian; a first
    call with room does not build one either (the tuner waits until calls have earned it)."""
    import corpus_torch

    monkeypatch.setattr(wire, "MOVED_BYTES", 64)
    monkeypatch.setenv("JACLI_CACHE_DIR", "off")
    monkeypatch.setenv("JACLI_THREADS", "1")  # no lanes (tests/test_onnx_lanes.py)
    module, x = corpus_torch.build("resnet18")
    paths, _ = corpus_torch.save_all(module, x, tmp_path, formats=("onnx",))
    want = corpus_torch.reference_jacobian(module, x)
    tight = 4 * wire.CONSTANT_COPIES * sum(np.asarray(w).nbytes for w in jacli.load(str(paths["onnx"]))._weights.values())

    def run(budget, strategy):
        if strategy:
            monkeypatch.setenv("JACLI_STRATEGY", strategy)
        else:
            monkeypatch.delenv("JACLI_STRATEGY", raising=False)
        m = jacli.load(str(paths["onnx"]))
        got = jacli.jacobian(m, x.numpy(), max_memory=budget)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        return m, {key[-1]: sess for key, sess in m._graphs.items() if key[0] == "vjp-tiled"}

    m, sessions = run(2 * tight, "constant")
    assert set(sessions) == {"constant"} and m._held == tight // 4
    assert not sessions["constant"].jacli_inputs & set(m._weights) and len(sessions["constant"].jacli_held) > len(m._weights)
    forward = jacli.jacobian(m, x.numpy(), mode="forward", max_memory=4 * tight)  # the JVP's session: constant too
    assert np.abs(forward - want).max() <= 1e-5 * np.abs(want).max()
    assert [key[-1] for key in m._graphs if key[0] == "jvp-tiled"] == ["constant"] and m._held == tight // 2
    m, sessions = run(2 * tight, "fed")
    assert list(sessions) == [("y",)] and m._held == 0 and sessions[("y",)].jacli_inputs >= set(m._weights)
    m, sessions = run(2 * tight, None)
    assert list(sessions) == [("y",)] and m._held == 0  # one call: no constant session yet
    xs = {"x": x.numpy()}
    seeds = {"y": np.ones((10, 2, 10), np.float32)}
    with jacli.model.budgeted(2 * tight):
        assert m.strategies("vjp", xs, seeds) == ("fed", "constant") and m.compiles("constant", xs, seeds)
    with jacli.model.budgeted(tight // 2):
        assert m.strategies("vjp", xs, seeds) == ()
    assert m.strategies("vjp", xs, seeds) == ()  # outside an API call: no budget to spend
    m, sessions = run(tight // 2, "constant")
    assert list(sessions) == [("y",)] and m._held == 0
    # with two threads each also runs in lanes, on sessions of one thread: the constant one's
    # copies counted as well
    monkeypatch.setenv("JACLI_THREADS", "2")
    with jacli.model.budgeted(2 * tight):
        assert m.strategies("vjp", xs, seeds) == ("fed", "constant", "fed-lanes", "constant-lanes")
    m, sessions = run(2 * tight, "constant-lanes")
    assert set(sessions) == {"constant"} and m._held == tight // 4
    (key,) = [key for key in m._graphs if key[0] == "vjp-tiled"]
    assert key[-2:] == ("lanes", "constant") and m._graphs[key].get_session_options().intra_op_num_threads == 1
    assert m.compiles("constant-lanes", xs, seeds) is False and m.compiles("constant", xs, seeds) is True
    m, sessions = run(2 * tight, "fed-lanes")
    assert set(sessions) == {"lanes"} and m._held == 0


def test_derived_and_cached_graphs_hold_no_weights_and_export_embeds_them(tmp_path, monkeypatch):
    model, values = mlp(sizes=(300, 1000, 1000, 5))
    path = save(model, tmp_path / "m.onnx")
    cache = tmp_path / "cache"
    monkeypatch.setenv("JACLI_CACHE_DIR", str(cache))
    np.save(tmp_path / "x.npy", np.random.default_rng(2).standard_normal((1, 300)).astype(np.float32))
    r = run_jacli("check", path, tmp_path / "x.npy", "--fd", "--directions", "3", "--json")
    assert r.code == 0, r.err
    stored = [f for f in cache.rglob("*.onnx")]
    assert {f.name.split("-")[0] for f in stored} >= {"f64", "jvp", "vjp"}
    assert max(f.stat().st_size for f in stored) < 64 << 10 < values[0].nbytes  # no weight inside
    again = run_jacli("check", path, tmp_path / "x.npy", "--fd", "--directions", "3", "--json")
    assert json.loads(again.out)["passed"] and json.loads(again.out)["worst"] == json.loads(r.out)["worst"]
    out = tmp_path / "g.onnx"
    assert run_jacli("export-grad", path, "-o", out, "--mode", "vjp").code == 0
    grad = onnx.load(str(out))
    assert {t.name for t in grad.graph.initializer} >= {"W0", "W1"}
    assert {v.name for v in grad.graph.input} == {"x", "ct:y"}
    import onnxruntime as ort

    sess = ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    x = np.load(tmp_path / "x.npy")
    ct = np.eye(5, dtype=np.float32)[2:3]
    (g,) = sess.run(None, {"x": x, "ct:y": ct})
    np.testing.assert_allclose(g[0], reference(values, x)[0][2], rtol=2e-4, atol=2e-6)


_MEASURE = """
import json, sys
import numpy as np
import jacli
def status(key):  # this process's own (ru_maxrss would carry a forking parent's peak)
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
def growth(work):
    base = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here
    return work(), status("VmHWM:") - base
small, big = sys.argv[1], sys.argv[2]
x = np.random.default_rng(0).standard_normal((1, {n})).astype(np.float32)
jacli.check(jacli.load(small), x, directions=2)  # every import, session kind and the evaluator warmed up
model, load = growth(lambda: jacli.load(big))  # what inspect does
result, check = growth(lambda: jacli.check(model, x, directions=2, max_memory=64 << 20))
print(json.dumps({{"passed": bool(result.passed), "load": load, "check": check}}))
"""


def test_inspect_and_check_hold_about_one_copy_of_a_100mb_model(tmp_path):
    sizes = (2048, 6144, 2048, 4)  # two 50 MB weights
    small = save(mlp(sizes=(2048, 8, 8, 4))[0], tmp_path / "small.onnx")
    big = save(mlp(sizes=sizes, seed=3)[0], tmp_path / "big.onnx")
    size = big.stat().st_size
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JACLI_CACHE_DIR": "off"}
    proc = subprocess.run([sys.executable, "-c", _MEASURE.format(n=sizes[0]), str(small), str(big)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout.splitlines()[-1])
    assert doc["passed"]
    # loading (and checking the graph) holds the file's bytes and nothing of the size of a
    # weight more (before: a parsed copy, and the checker's own, 3x in all)
    assert doc["load"] < 1.3 * size, (doc, size)
    # the check adds one weight at a time in float64 (before: the parsed graph, the model's
    # session, the float64 one and the JVP and VJP graphs each held a copy, 16x in all)
    assert doc["load"] + doc["check"] < 2.5 * size, (doc, size)


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_the_float64_evaluator_casts_a_large_weight_a_block_at_a_time(op, monkeypatch):
    import tracemalloc

    from jacli.backends.onnx import float64

    monkeypatch.setattr(float64, "CAST_BYTES", 4 << 20)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((1000, 6000)).astype(np.float32)  # 24 MB, 48 MB in float64
    bias = rng.standard_normal(1000 if op == "Gemm" else 6000).astype(np.float32)
    if op == "Gemm":  # y = x Wᵀ + b, as torch's Linear exports
        nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1, alpha=0.5)]
        shape, expect = [6000, 1000], lambda x: 0.5 * x @ w.astype(np.float64).T + bias
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
        shape, expect = [1000, 6000], lambda x: x @ w.astype(np.float64) + bias
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, shape[0]]),
                                           helper.make_tensor_value_info("W", TensorProto.FLOAT, [1000, 6000])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
                              initializer=[numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    evaluator = float64.Evaluator(model)
    x = rng.standard_normal((2, shape[0]))
    tracemalloc.start()
    try:
        (y,) = evaluator.run(["y"], {"x": x, "W": w})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(y, expect(x), rtol=1e-12, atol=1e-12)
    assert y.dtype == np.float64 and peak < w.nbytes  # never the whole float64 copy (2x w.nbytes)


_ARENA = """
import gc, json, resource, sys
import numpy as np
import jacli
def rss():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
model = jacli.load(sys.argv[1])
x = np.random.default_rng(0).standard_normal((64, 100)).astype(np.float32)
want = jacli.jacobian(model, x)
before = faults()
got = jacli.jacobian(model, x)
faulted = (faults() - before) * resource.getpagesize()
held = rss()
del model
gc.collect()
print(json.dumps({"same": bool(np.array_equal(got, want)), "faulted": faulted, "freed": held - rss()}))
"""


@pytest.mark.parametrize("arena", ["on", "off"])
def test_the_shared_arena_keeps_a_calls_memory_for_the_next_and_frees_it_with_the_model(tmp_path, arena):
    """Sessions take their intermediates from one onnxruntime arena (arena.py): a second
    Jacobian page-faults in next to nothing, where without it (JACLI_ARENA=off) it faults
    its whole working set in again (blocks over glibc's mmap threshold go back to the
    kernel on free); the arena's memory is handed back when the last model is gone."""
    sizes = (100, 20000, 10)
    path = save(mlp(sizes=sizes)[0], tmp_path / "wide.onnx")
    work = 10 * 64 * sizes[1] * 4  # one (10 seeds x 64 samples, 20000) float32 intermediate: 51 MB
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JACLI_CACHE_DIR": "off", "JACLI_ARENA": arena,
           "JACLI_STRATEGY": "whole"}  # (not a trial in lanes, with their own sessions, on the second call)
    proc = subprocess.run([sys.executable, "-c", _ARENA, str(path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout.splitlines()[-1])
    assert doc["same"]
    if arena == "on":
        assert doc["faulted"] < 0.1 * work, doc
        assert doc["freed"] > work, doc
    else:
        assert doc["faulted"] > work, doc


def test_the_arenas_shrink_graph_is_the_identity_onnx_builds():
    """arena.SHRINK_GRAPH is written out so that releasing the arena imports no onnx."""
    from jacli.backends.onnx import arena

    built = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])], "shrink",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])]),
        opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    assert onnx.load_model_from_string(arena.SHRINK_GRAPH) == built
    onnx.checker.check_model(built)
    arena.release()  # runs (a no-op where nothing is free)
