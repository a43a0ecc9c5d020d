"""jacli diff: derivative parity of two models (any formats) or a model and its baseline.

References are independent of the streaming comparison: each model's Jacobian computed
whole by jacli.jacobian (and torch's float64 autograd for the straight-through
estimator's known derivative), differences taken directly in numpy."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

import jacli

from conftest import ROOT, run_jacli

import torch


# --- models -------------------------------------------------------------------------------
class Net(torch.nn.Module):
    """conv -> tanh -> linear -> softmax on (3, 5, 5) images."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 5 * 5, 6)

    def forward(self, x):
        return torch.softmax(self.fc(torch.tanh(self.conv(x)).flatten(1)), -1)


class RoundSte(torch.autograd.Function):
    """round() with a straight-through backward (derivative 1)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class Quantise(torch.nn.Module):
    """y = round(3 x) / 3 with the straight-through estimator, as a custom function."""

    def forward(self, x):
        return RoundSte.apply(3 * x) / 3


class DetachSte(torch.nn.Module):
    """The same estimator written with detach (traceable): x + (round(x) - x).detach()."""

    def forward(self, x):
        s = 3 * x
        return (s + (torch.round(s) - s).detach()) / 3


def _export(module, x, path, dynamo=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, (torch.from_numpy(x),), str(path), dynamo=True, input_names=["x"],
                              output_names=["y"], dynamic_shapes=({0: torch.export.Dim("batch")},))
        else:
            torch.onnx.export(module, (torch.from_numpy(x),), str(path), dynamo=False, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return path


def _script(module, x, path):
    torch.jit.save(torch.jit.trace(module, torch.from_numpy(x)), str(path))
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    torch.manual_seed(0)
    net = Net().eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32)
    np.save(d / "x.npy", x)
    changed = Net().eval()
    changed.load_state_dict(net.state_dict())
    with torch.no_grad():
        changed.fc.weight[2, 7] += 0.05  # one weight: outputs and derivatives move a little
    q = np.random.default_rng(1).uniform(-2, 2, (3, 6)).astype(np.float32)
    np.save(d / "q.npy", q)
    return {
        "dir": d, "x": x, "q": q, "net": net,
        "net.pt": _script(net, x, d / "net.pt"),
        "net.onnx": _export(net, x, d / "net.onnx"),
        "changed.pt": _script(changed, x, d / "changed.pt"),
        "ste.pt": _script(DetachSte(), q, d / "ste.pt"),
        "ste.onnx": _export(DetachSte(), q, d / "ste.onnx"),
        "quantise.onnx": _export(Quantise(), q, d / "quantise.onnx"),
    }


def _json(r):
    assert r.code in (0, 1), r.stderr
    return json.loads(r.out)


def _jacobian(path, x):

    return jacli.jacobian(jacli.load(str(path)), x).astype(np.float64)


# --- agreement across formats and exporters ---------------------------------------------------
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_torch_model_and_its_onnx_export_agree(models, dynamo):
    onnx_path = models["net.onnx"] if not dynamo else _export(models["net"], models["x"], models["dir"] / "net_dynamo.onnx", True)
    r = run_jacli("diff", models["net.pt"], onnx_path, models["dir"] / "x.npy", "--json")
    doc = _json(r)
    assert r.code == 0 and doc["passed"], doc
    assert [(l["a"], l["b"], l["how"]) for l in doc["links"]["inputs"]] == [("x", "x", "name")]
    assert [(l["b"], l["how"]) for l in doc["links"]["outputs"]] == [("y", "position")]  # TorchScript says "output"
    (jac,) = doc["jacobians"]
    assert jac["entries"] == 2 * 6 * 75 and jac["mismatches"] == 0
    # the reported error is the true one (both Jacobians formed whole, independently)
    true = np.abs(_jacobian(models["net.pt"], models["x"]) - _jacobian(onnx_path, models["x"])).max()
    assert jac["max_abs_error"] == pytest.approx(true, rel=1e-6, abs=1e-12)
    assert 0 < true < 1e-5


def test_terminal_summary_and_exit_codes(models):
    r = run_jacli("diff", models["net.pt"], models["net.onnx"], models["dir"] / "x.npy")
    assert r.code == 0 and "AGREE" in r.out and "doutput/dx" in r.out
    r = run_jacli("diff", models["net.pt"], models["net.onnx"], models["dir"] / "missing.npy")
    assert r.code == 2 and r.stderr.startswith("Error:") and "Traceback" not in r.stderr
    r = run_jacli("diff", models["net.pt"], models["net.onnx"], models["dir"] / "x.npy", "--check-stat", "mode")
    assert r.code == 2 and "elementwise" in r.stderr
    r = run_jacli("diff", models["net.pt"], models["net.onnx"], models["dir"] / "x.npy", "--map", "nope=y")
    assert r.code == 2 and "no input or output 'nope'" in r.stderr


# --- outputs agree, derivatives do not ----------------------------------------------------------
def test_custom_backward_lost_in_export_is_caught_and_located(models):
    """The straight-through estimator as a custom autograd.Function: its ONNX export keeps
    round() (derivative 0) but not the backward (derivative 1)."""
    from jacli.backends.torchscript import TorchModel

    a = TorchModel.wrap(Quantise(), "quantise (live module)", "torch")
    b = jacli.load(str(models["quantise.onnx"]))
    result = jacli.diff(a, b, models["q"])
    assert not result.passed
    assert all(c.passed for c in result.outputs)  # the same function ...
    (jac,) = result.jacobians
    assert not jac.passed and jac.mismatches == 3 * 6  # ... but every diagonal entry differs
    # independent reference: torch's own autograd of the live module in float64
    xt = torch.from_numpy(models["q"]).double().requires_grad_()
    J = torch.autograd.functional.jacobian(lambda v: Quantise()(v).sum(0), xt).numpy().transpose(1, 0, 2)
    assert np.allclose(J, np.eye(6)[None])
    for w in jac.worst:
        assert w["output_index"] == w["input_index"]
        assert (w["a"], w["b"]) == (pytest.approx(1.0), 0.0)
    assert {(w["sample"], w["output_index"][0]) for w in jac.worst} <= {(s, i) for s in range(3) for i in range(6)}
    assert jac.max_abs == pytest.approx(1.0)


def test_straight_through_estimator_torchscript_vs_onnx(models):
    r = run_jacli("diff", models["ste.pt"], models["ste.onnx"], models["dir"] / "q.npy")
    assert r.code == 1, r.stderr
    assert "DIFFER" in r.out and re.search(r"sample \d, doutput\[(\d)\]/dx\[\1\]: A 1, B 0", r.out), r.out
    doc = _json(run_jacli("diff", models["ste.pt"], models["ste.onnx"], models["dir"] / "q.npy", "--json", "--locate"))
    assert not doc["passed"] and all(o["passed"] for o in doc["outputs"])
    worst = doc["jacobians"][0]["worst"]
    assert worst and all(w["output_index"] == w["input_index"] and w["a"] == pytest.approx(1) and w["b"] == 0
                         for w in worst)
    assert doc["locate"]["available"] is False and "torchscript" in doc["locate"]["reason"]


def test_tolerances_and_statistics(models):
    args = ("diff", models["ste.pt"], models["ste.onnx"], models["dir"] / "q.npy", "--json")
    assert run_jacli(*args).code == 1
    # 1 in 6 entries differs: the median error is 0, the mean 1/6, the max 1
    doc = _json(run_jacli(*args, "--check-stat", "median"))
    assert doc["passed"] and doc["jacobians"][0]["median_abs_error"] == 0
    assert doc["jacobians"][0]["mean_abs_error"] == pytest.approx(1 / 6, rel=1e-6)
    assert run_jacli(*args, "--check-stat", "mean", "--atol", "0.2").code == 0
    assert run_jacli(*args, "--check-stat", "mean", "--atol", "0.1").code == 1
    assert run_jacli(*args, "--atol", "doutput/dx:1.5").code == 0  # per Jacobian
    assert run_jacli(*args, "--atol", "output:1.5").code == 0  # per output (and its Jacobians)
    doc = _json(run_jacli(*args, "--atol", "other:1.5"))
    assert not doc["passed"] and doc["jacobians"][0]["atol"] == 1e-5


def test_directions_catch_the_difference_with_a_stated_miss_probability(models):
    from jacli.engine.diff import miss_probability

    ste, onnx = jacli.load(str(models["ste.pt"])), jacli.load(str(models["ste.onnx"]))
    result = jacli.api.diff(ste, onnx, models["q"], directions=2, seed=3)
    assert result.kind == "directions" and not result.passed
    assert result.miss_probability == pytest.approx(miss_probability(2)) and result.miss_probability < 1e-4
    assert {c.where["probe"] for c in result.jacobians if not c.passed} == {"jvp", "vjp"}
    net_pt, net_onnx = jacli.load(str(models["net.pt"])), jacli.load(str(models["net.onnx"]))
    assert jacli.api.diff(net_pt, net_onnx, models["x"], directions=2).passed


# --- streaming statistics equal a direct computation, whole samples or parts ---------------------
@pytest.mark.parametrize("budget", [None, 4096], ids=["sample-blocks", "parts"])
def test_streamed_statistics_are_exact(models, budget):

    a, b = jacli.load(str(models["net.pt"])), jacli.load(str(models["changed.pt"]))
    result = jacli.api.diff(a, b, models["x"], max_memory=budget, atol=1e-4, rtol=1e-3)
    (jac,) = result.jacobians
    Ja, Jb = _jacobian(models["net.pt"], models["x"]), _jacobian(models["changed.pt"], models["x"])
    d = np.abs(Ja - Jb)
    excess = d / np.maximum(1e-4, 1e-3 * np.abs(Jb))
    assert jac.count == Ja.size
    # the models run in float32: a part computed by another strategy (or thread count) may round
    # each entry differently by a few ulp of the Jacobian's scale, never more
    ulp = 8 * np.finfo(np.float32).eps * max(np.abs(Ja).max(), np.abs(Jb).max())
    assert jac.max_abs == pytest.approx(d.max(), rel=1e-6, abs=ulp)
    assert jac.mismatches == int((excess > 1).sum()) > 0
    worst = np.unravel_index(np.argmax(excess), Ja.shape)
    w = jac.worst[0]
    assert (w["sample"], *w["output_index"], *w["input_index"]) == tuple(int(i) for i in worst)
    assert jac.sum_abs / jac.count == pytest.approx(d.mean(), rel=1e-6, abs=ulp)
    assert jac.median("abs") == pytest.approx(np.sort(d.ravel())[(d.size + 1) // 2 - 1], rel=0.03)


# --- layouts: a Keras model against the same weights in torch -----------------------------------
@pytest.fixture(scope="session")
def keras_pair(tmp_path_factory):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    d = tmp_path_factory.mktemp("layouts")
    inp = keras.Input((5, 5, 3), name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="tanh", name="c1")(inp)
    out = keras.layers.Conv2D(2, 3, padding="same", name="c2")(h)
    km = keras.Model(inp, out)
    rng = np.random.default_rng(5)
    for layer in km.layers[1:]:
        layer.set_weights([rng.standard_normal(w.shape).astype(np.float32) * 0.3 for w in layer.get_weights()])
    km.save(d / "conv.keras")

    class Port(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 2, 3, padding=1)

        def forward(self, x):
            return self.c2(torch.tanh(self.c1(x)))

    port = Port().eval()
    with torch.no_grad():
        for conv, layer in ((port.c1, km.layers[1]), (port.c2, km.layers[2])):
            kernel, bias = layer.get_weights()
            conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1)))  # (kh, kw, in, out) -> (out, in, kh, kw)
            conv.bias.copy_(torch.from_numpy(bias))
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)  # NCHW: torch's layout (model A)
    np.save(d / "x.npy", x)
    return {"keras": d / "conv.keras", "torch": _script(port, x, d / "port.pt"), "x": d / "x.npy"}


def test_keras_model_against_its_torch_port_with_layout_map(keras_pair):
    p = keras_pair
    r = run_jacli("diff", p["torch"], p["keras"], p["x"], "--map", "x=image:nhwc", "--map", "output=c2:nhwc", "--json")
    doc = _json(r)
    assert r.code == 0 and doc["passed"], doc
    assert {(l["a"], l["b"], l["layout"]) for k in ("inputs", "outputs") for l in doc["links"][k]} == {
        ("x", "image", "nhwc"), ("output", "c2", "nhwc")}
    assert doc["jacobians"][0]["entries"] == 2 * (2 * 25) * (3 * 25)
    # the layout is what makes them agree: mapping only the input leaves the output transposed
    r = run_jacli("diff", p["torch"], p["keras"], p["x"], "--map", "x=image:nhwc")
    assert r.code == 2 and "nhwc" in r.stderr and "'output'" in r.stderr
    r = run_jacli("diff", p["torch"], p["keras"], p["x"])
    assert r.code == 2 and "--map x=image:nhwc" in r.stderr
    # the other way round: Keras as A (its input channels-last), torch as B, with nchw
    nhwc = p["x"].parent / "x_nhwc.npy"
    np.save(nhwc, np.load(p["x"]).transpose(0, 2, 3, 1))
    doc = _json(run_jacli("diff", p["keras"], p["torch"], nhwc, "--map", "image=x:nchw", "--map", "c2=output:nchw",
                          "--json"))
    assert doc["passed"] and doc["jacobians"][0]["name"] == "dc2/dimage" and doc["jacobians"][0]["max_abs_error"] < 1e-5


# --- loading: --format (A's), --format-b (B's), --custom-objects -------------------------------
def test_format_and_format_b_load_files_whose_names_say_nothing(models, tmp_path):
    renamed = tmp_path / "net.model"  # the ONNX export under a name that does not tell its format
    renamed.write_bytes(models["net.onnx"].read_bytes())
    x = models["dir"] / "x.npy"
    r = run_jacli("diff", models["net.pt"], renamed, x)  # B's: the error names B's option
    assert r.code == 2 and "cannot tell the format" in r.stderr and "use --format-b onnx|" in r.stderr, r.stderr
    doc = _json(run_jacli("diff", models["net.pt"], renamed, x, "--format-b", "onnx", "--json"))
    assert doc["passed"] and doc["b"]["format"] == "onnx" and doc["jacobians"][0]["entries"] == 2 * 6 * 75
    r = run_jacli("diff", renamed, models["net.pt"], x)
    assert r.code == 2 and "use --format onnx|" in r.stderr, r.stderr
    doc = _json(run_jacli("diff", renamed, models["net.pt"], x, "--format", "onnx", "--json"))
    assert doc["passed"] and doc["a"]["format"] == "onnx" and doc["b"]["format"] == "torchscript"
    r = run_jacli("diff", renamed, models["net.pt"], x, "--format-b", "onnx")  # each option is its own model's
    assert r.code == 2 and "net.model" in r.stderr, r.stderr
    # against a baseline: --format is the model's; a baseline has no format to give
    base = tmp_path / "base.h5"
    assert run_jacli("compute", models["net.pt"], x, "-o", base, "-q").code == 0
    doc = _json(run_jacli("diff", renamed, base, "--format", "onnx", "--json"))
    assert doc["passed"] and doc["a"]["format"] == "onnx" and doc["b"] == {"baseline": str(base)}
    r = run_jacli("diff", models["net.pt"], base, "--format-b", "torchscript")
    assert r.code == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("Error: --format-b torchscript: B ")
    assert "is a baseline" in r.stderr and "drop --format-b" in r.stderr and "Traceback" not in r.stderr


def test_custom_keras_layers_on_both_sides_and_against_a_baseline(tmp_path, monkeypatch):
    """A Keras model with a registered custom layer, as .keras (A) and as .h5 (B): refused
    without --custom-objects (the message says so), compared with it, the module imported
    once for both models."""
    import keras

    import corpus_keras as ck

    model = ck.BUILDERS["custom"]()
    paths = {fmt: ck.save("custom", model, fmt, tmp_path) for fmt in ("keras", "h5")}
    x = tmp_path / "x.npy"
    np.save(x, ck.inputs(model, 2)["a"])
    log = tmp_path / "imports.log"  # the module's code notes each time it runs
    layers = tmp_path / "my_layers.py"
    layers.write_text(ck.CUSTOM_LAYERS.read_text() + f"\nopen({str(log)!r}, 'a').write('imported\\n')\n")
    # as in a fresh process: the class is not registered until its module is imported
    monkeypatch.delitem(keras.saving.get_custom_objects(), "jacli_tests>ScaledSoftsign")
    r = run_jacli("diff", paths["keras"], paths["h5"], x)
    assert r.code == 2 and "'ScaledSoftsign'" in r.stderr and "--custom-objects" in r.stderr, r.stderr
    doc = _json(run_jacli("diff", paths["keras"], paths["h5"], x, "--custom-objects", layers, "--json"))
    assert doc["passed"] and [j["entries"] for j in doc["jacobians"]] == [2 * 3 * 4], doc
    assert (doc["a"]["format"], doc["b"]["format"]) == ("keras", "keras") and log.read_text() == "imported\n"
    base = tmp_path / "base.h5"
    assert run_jacli("compute", paths["keras"], x, "--custom-objects", layers, "-o", base, "-q").code == 0
    monkeypatch.delitem(keras.saving.get_custom_objects(), "jacli_tests>ScaledSoftsign")  # registered by the import
    r = run_jacli("diff", paths["h5"], base)
    assert r.code == 2 and "ScaledSoftsign'" in r.stderr and "--custom-objects" in r.stderr, r.stderr
    doc = _json(run_jacli("diff", paths["h5"], base, "--custom-objects", layers, "--json"))
    assert doc["passed"] and doc["jacobians"][0]["max_abs_error"] < 1e-6, doc


# --- baselines -------------------------------------------------------------------------------------
def test_baseline_round_trip(models, tmp_path):
    import h5py

    base = tmp_path / "base.h5"
    assert run_jacli("compute", models["net.pt"], models["dir"] / "x.npy", "-o", base, "-q").code == 0
    with h5py.File(base, "r") as f:
        assert np.array_equal(f["jacli_input/x"][()], models["x"]) and len(f.attrs["input_sha256"]) == 64
    doc = _json(run_jacli("diff", models["net.pt"], base, "--json"))
    assert doc["passed"] and doc["b"] == {"baseline": str(base)} and doc["jacobians"][0]["max_abs_error"] == 0
    assert doc["outputs"][0]["max_abs_error"] == 0
    assert run_jacli("diff", models["net.onnx"], base).code == 0  # the export against the source's baseline
    r = run_jacli("diff", models["changed.pt"], base)  # a changed model fails the gate
    assert r.code == 1 and "DIFFER" in r.out
    # in parts, read back piece by piece from the file: the same verdicts
    # (the Python API: the CLI's --max-memory has a 1 MiB floor)
    assert not jacli.diff(jacli.load(models["changed.pt"]), str(base), max_memory=4096).passed
    assert jacli.diff(jacli.load(models["net.onnx"]), str(base), max_memory=4096).passed
    r = run_jacli("diff", models["net.pt"], base, models["dir"] / "x.npy")
    assert r.code == 2 and "brings its own input" in r.stderr
    with h5py.File(base, "r+") as f:  # a baseline whose input was altered is refused
        f["jacli_input/x"][0, 0, 0, 0] += 1
    r = run_jacli("diff", models["net.pt"], base)
    assert r.code == 2 and "sha256" in r.stderr



def test_baseline_reading_other_files_is_refused(models, tmp_path):
    """A baseline is read as untrusted input: a Jacobian (or input) that links to, or keeps
    its data in, another file is refused before anything is compared."""
    import h5py

    base = tmp_path / "base.h5"
    assert run_jacli("compute", models["net.pt"], models["dir"] / "x.npy", "-o", base, "-q").code == 0
    with h5py.File(base, "r") as f:
        key = next(iter(json.loads(f.attrs["jacobians"])))
        shape, dtype = f[key].shape, f[key].dtype
    secret = tmp_path / "secret.h5"
    with h5py.File(secret, "w") as f:
        f["J"] = np.zeros(shape, dtype)
    for how in ("link", "external"):
        edited = tmp_path / f"{how}.h5"
        edited.write_bytes(base.read_bytes())
        with h5py.File(edited, "r+") as f:
            del f[key]
            if how == "link":
                f[key] = h5py.ExternalLink(str(secret), "J")
            else:
                raw = tmp_path / "raw.bin"
                raw.write_bytes(np.zeros(shape, dtype).tobytes())
                f.create_dataset(key, shape=shape, dtype=dtype, external=[(str(raw), 0, h5py.h5f.UNLIMITED)])
        r = run_jacli("diff", models["net.pt"], edited)
        assert r.code == 2 and r.stderr.startswith("Error:") and "self-contained" in r.stderr, (how, r.stderr)

# --- bounded memory ------------------------------------------------------------------------------
_MEMORY_PROBE = r"""
import json, sys
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import jacli

n, samples, d, budget = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rng = np.random.default_rng(0)
W = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
for name, w in (("a", W), ("b", W * np.float32(1.0001))):
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                          [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), f"{d}/{name}.onnx")
x = rng.standard_normal((samples, n)).astype(np.float32)
a, b = jacli.load(f"{d}/a.onnx"), jacli.load(f"{d}/b.onnx")
jacli.api.diff(a, b, x[:1], max_memory=1 << 20)  # warm up: sessions and derivative graphs built


def status(field):  # bytes
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))


def rss_now():  # and the peak (VmHWM) reset to it
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")


before = rss_now()
result = jacli.api.diff(a, b, x, max_memory=budget, rtol=1e-6, atol=1e-9)
growth = status("VmHWM") - before
(j,) = result.jacobians
before = rss_now()
held = jacli.jacobian(a, x, max_memory=budget)  # calibration: one Jacobian held whole
calibration = status("VmHWM") - before
print(json.dumps({"growth": growth, "calibration": calibration, "entries": j.count, "mismatches": j.mismatches,
                  "jacobian_bytes": held.nbytes}))
"""


def test_memory_stays_bounded_on_a_jacobian_larger_than_the_budget(tmp_path):
    """Two 768 -> 768 models, 8 samples: each Jacobian is 18 MiB, the budget 4 MiB. Peak
    RSS (VmHWM, reset before each measurement) of the diff, and of jacli.jacobian, which
    holds one Jacobian: the same measurement sees that one."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, "768", "8", str(tmp_path), str(4 << 20)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["entries"] == 8 * 768 * 768 and doc["mismatches"] > 0  # it did compare, and finds the 1e-4 change
    assert doc["calibration"] > 0.9 * doc["jacobian_bytes"], doc
    assert doc["growth"] < doc["jacobian_bytes"] / 3, doc  # neither Jacobian was ever held


# --- locate ---------------------------------------------------------------------------------------
def _graph(d, name, act):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Mul", ["x", "one"], ["s"], name="scale"),
             act,
             helper.make_node("MatMul", ["h", "W"], ["z"], name="mm"),
             helper.make_node("Tanh", ["z"], ["y"], name="out")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
                          [numpy_helper.from_array(np.ones(1, np.float32), "one"),
                           numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
                           numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")])
    path = d / f"{name}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_locate_names_the_planted_node(tmp_path):
    """Relu against Max(x, 0): the same function, but at 0 Relu's derivative is 0 and Max
    splits it evenly (0.5); the input holds exact zeros."""
    from onnx import helper

    a = _graph(tmp_path, "a", helper.make_node("Relu", ["s"], ["h"], name="act"))
    b = _graph(tmp_path, "b", helper.make_node("Max", ["s", "zero"], ["h"], name="act_max"))
    x = np.array([[0.0, 1.0, -1.0, 0.0], [0.5, 0.0, 2.0, -0.3]], np.float32)
    np.save(tmp_path / "x.npy", x)
    doc = _json(run_jacli("diff", a, b, tmp_path / "x.npy", "--locate", "--json"))
    assert not doc["passed"] and all(o["passed"] for o in doc["outputs"])
    loc = doc["locate"]
    assert loc["available"] and loc["found"], loc
    assert (loc["node"], loc["op_type"], loc["b_op_type"], loc["tensor"]) == ("act", "Relu", "Max", "h")
    assert loc["values_agree"] and loc["agreeing_before"] == 1  # the Mul before it agrees
    r = run_jacli("diff", a, b, tmp_path / "x.npy", "--locate")
    assert "first differing node act (Relu in A, Max in B)" in " ".join(r.out.split())
    assert _json(run_jacli("diff", a, a, tmp_path / "x.npy", "--locate", "--json"))["locate"]["found"] is False


def test_locate_against_a_baseline_with_probes(tmp_path):
    from onnx import helper

    a = _graph(tmp_path, "a", helper.make_node("Relu", ["s"], ["h"], name="act"))
    b = _graph(tmp_path, "b", helper.make_node("Max", ["s", "zero"], ["h"], name="act_max"))
    np.save(tmp_path / "x.npy", np.array([[0.0, 1.0, -1.0, 0.0], [0.5, 0.0, 2.0, -0.3]], np.float32))
    base, plain = tmp_path / "base.h5", tmp_path / "plain.h5"
    assert run_jacli("compute", a, tmp_path / "x.npy", "-o", base, "--locate-probes", "-q").code == 0
    assert run_jacli("compute", a, tmp_path / "x.npy", "-o", plain, "-q").code == 0
    doc = _json(run_jacli("diff", b, base, "--locate", "--json"))
    assert not doc["passed"]
    loc = doc["locate"]
    assert loc["found"] and (loc["node"], loc["op_type"], loc["b_op_type"]) == ("act_max", "Max", "Relu"), loc
    assert loc["values_agree"] and loc["agreeing_before"] == 1
    assert _json(run_jacli("diff", a, base, "--locate", "--json"))["locate"]["found"] is False
    loc = _json(run_jacli("diff", b, plain, "--locate", "--json"))["locate"]
    assert not loc["available"] and "--locate-probes" in loc["reason"]
    r = run_jacli("compute", a, tmp_path / "x.npy", "-o", tmp_path / "J.npz", "--locate-probes")
    assert r.code == 2 and "FILE.h5" in r.stderr and not (tmp_path / "J.npz").exists()


def test_name_matching():
    from jacli.engine.mapping import match, parse_maps
    from jacli.errors import InputError

    maps = parse_maps(["x=image:nhwc", "y=out"])
    assert maps == {"x": ("image", "nhwc"), "y": ("out", None)}
    links = match(["x", "t", "u"], ["image", "v", "u"], maps, "input")
    assert [(l.a, l.b, l.how, l.layout) for l in links] == [
        ("x", "image", "map", "nhwc"), ("t", "v", "position", None), ("u", "u", "name", None)]
    with pytest.raises(InputError, match="--map"):
        match(["a", "b"], ["c"], {}, "output")
    with pytest.raises(InputError, match="already has a counterpart"):
        match(["x", "y"], ["y", "z"], {}, "input")  # x's position is B's y, taken by A's y
    assert [l.b for l in match(["p", "q"], ["s", "t"], {}, "output")] == ["s", "t"]


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_several_pairs_in_parts_match_a_direct_computation(mode):
    """Two inputs, two outputs, each sample in parts (a tiny budget): every pair's error
    statistics equal those of the Jacobians formed whole."""

    from conftest import SAMPLES

    x = dict(np.load(SAMPLES / "multi_input.npz"))
    a, b = jacli.load(str(SAMPLES / "multi.onnx")), jacli.load(str(SAMPLES / "multi.pt"))
    result = jacli.api.diff(a, b, x, mode=mode, max_memory=256, atol=0, rtol=0)
    Ja, Jb = jacli.jacobian(a, x), jacli.jacobian(b, x)
    names = {"s": "output_0", "p": "output_1"}  # TorchScript's names for the outputs, by position
    assert [c.name for c in result.jacobians] == ["ds/da", "ds/db", "dp/da", "dp/db"]
    for c in result.jacobians:
        d = np.abs(Ja[c.name].astype(np.float64) - Jb[f"d{names[c.where['of']]}/d{c.where['wrt']}"])
        assert c.count == d.size and c.max_abs == d.max() and c.mismatches == int((d > 0).sum())


def test_locate_between_a_torch_export_program_and_its_dynamo_onnx_export(models):
    """The dynamo exporter keeps the program's tensor names (conv2d, tanh, linear): a change
    to the linear layer's weights is located there, after the agreeing conv2d and tanh."""
    changed = Net().eval()
    changed.load_state_dict(models["net"].state_dict())
    with torch.no_grad():
        changed.fc.weight[2, 7] += 0.05
    d, x = models["dir"], torch.from_numpy(models["x"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(models["net"], (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(d / "net.pt2"))
    onnx_path = _export(changed, models["x"], d / "changed_dynamo.onnx", dynamo=True)
    doc = _json(run_jacli("diff", d / "net.pt2", onnx_path, d / "x.npy", "--locate", "--json"))
    assert not doc["passed"]
    loc = doc["locate"]
    assert loc["found"] and (loc["tensor"], loc["op_type"], loc["b_op_type"]) == ("linear", "aten.linear", "Gemm"), loc
    assert loc["agreeing_before"] == 2 and not loc["values_agree"]
    # and against a baseline of the program, with its probes
    base = d / "net_pt2.h5"
    assert run_jacli("compute", d / "net.pt2", d / "x.npy", "-o", base, "--locate-probes", "-q").code == 0
    loc = _json(run_jacli("diff", onnx_path, base, "--locate", "--json"))["locate"]
    assert loc["found"] and (loc["tensor"], loc["op_type"], loc["b_op_type"]) == ("linear", "Gemm", "aten.linear"), loc


class ConvBN(torch.nn.Module):
    """conv -> batch norm -> tanh -> linear -> softmax on (3, 5, 5) images."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 5 * 5, 6)

    def forward(self, x):
        return torch.softmax(self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1)), -1)


def test_locate_through_a_batch_norm_folded_into_its_convolution(models, tmp_path):
    """A program's batch norm is folded into the convolution before it (torch_export), whose
    output is then the batch norm's: it is not compared with the tensor an unoptimised ONNX
    export names conv2d (the convolution's alone), so the same weights locate nothing, and a
    changed linear layer is located there, after the agreeing tanh."""
    torch.manual_seed(1)
    net = ConvBN().eval()
    with torch.no_grad():
        net.bn.running_mean.normal_(), net.bn.running_var.uniform_(0.5, 2), net.bn.weight.normal_()
    changed = ConvBN().eval()
    changed.load_state_dict(net.state_dict())
    with torch.no_grad():
        changed.fc.weight[2, 7] += 0.05
    x = torch.from_numpy(models["x"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, str(tmp_path / "net.pt2"))
        for name, module in (("same", net), ("changed", changed)):  # not optimised: Conv and BatchNormalization apart
            torch.onnx.export(module, (x,), str(tmp_path / f"{name}.onnx"), dynamo=True, optimize=False,
                              input_names=["x"], output_names=["y"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    a, data = tmp_path / "net.pt2", models["dir"] / "x.npy"
    doc = _json(run_jacli("diff", a, tmp_path / "same.onnx", data, "--locate", "--json"))
    assert doc["passed"] and doc["locate"]["found"] is False and doc["locate"]["checked"] >= 1, doc["locate"]
    loc = _json(run_jacli("diff", a, tmp_path / "changed.onnx", data, "--locate", "--json"))["locate"]
    assert loc["found"] and (loc["tensor"], loc["b_op_type"]) == ("linear", "Gemm"), loc
    assert loc["agreeing_before"] == 1 and not loc["values_agree"]
    model = jacli.load(str(a))
    jacli.jacobian(model, models["x"])
    assert not any("batch_norm" in str(n.target) for n in model.module.graph.nodes)
