"""`jacli check --fd`: no false alarms on correct models in every format over many seeds
and input scales; broken gradients (a misplaced detach(), a wrong tf.custom_gradient)
fail and are located; a ReLU switch point is a kink, not a bug; batch statistics are
reported as cross-sample leakage; the finite-difference error estimates are honest."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import jacli
import _check_models as cm
from conftest import SAMPLES, run_jacli
from jacli.cli.main import cli, main
from jacli.engine import check as chk
from jacli.engine import columns
from jacli.engine.fd import estimate_columns
from jacli.errors import InputError, UnsupportedError
from jacli.model import Model, TensorSpec

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
SCALES = (0.3, 1.0, 3.0, 10.0)  # input scales cycled over the seeds


@pytest.fixture(scope="session")
def weights():
    return cm.weights(0)


@pytest.fixture(scope="session")
def torch_paths(tmp_path_factory, weights):
    import torch

    torch.set_num_threads(1)  # tiny models: threads only contend with the other pytest worker
    return cm.torch_models(weights, tmp_path_factory.mktemp("check_torch"))


@pytest.fixture(scope="session")
def keras_paths(tmp_path_factory, weights):
    import tensorflow as tf

    try:  # as for torch; possible only before TensorFlow's runtime starts
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:
        pass
    return cm.keras_models(weights, tmp_path_factory.mktemp("check_keras"))


@pytest.fixture(scope="session")
def custom_gradient_path(tmp_path_factory, weights):
    return cm.savedmodel_wrong_custom_gradient(weights, tmp_path_factory.mktemp("check_tf"))


@pytest.fixture(scope="session")
def onnx_path(tmp_path_factory, weights):
    return cm.onnx_mlp(weights, tmp_path_factory.mktemp("check_onnx"))


def run_cli(*args):
    """The real entry point in a subprocess: exit code, stdout, stderr."""
    p = subprocess.run([sys.executable, "-m", "jacli", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "OMP_NUM_THREADS": "1"})
    return p.returncode, p.stdout, p.stderr


def run_main(capsys, *args):
    """The real entry point (``jacli.cli.main.main``, error handling included) in-process."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def invoke(*args):
    """In-process through click (exit 0/1 come from the command itself)."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout


def save_input(tmp_path, x, name="x.npy"):
    path = tmp_path / name
    np.save(path, x)
    return path


# --- correct models, every format: no false alarms ----------------------------------------
CORRECT = [  # (fixture, key, per-sample input shape, entries per sample, FD dtype)
    ("torch_paths", "mlp", (6,), 4 * 6, "float64"),
    ("torch_paths", "cnn", (1, 6, 6), 3 * 36, "float64"),
    ("torch_paths", "coupling", (4,), 4 * 4 + 4, "float64"),
    ("keras_paths", "mlp.keras", (6,), 4 * 6, "float64"),
    ("keras_paths", "cnn.keras", (6, 6, 1), 3 * 36, "float64"),
    ("keras_paths", "coupling.keras", (4,), 4 * 4 + 4, "float64"),
    ("keras_paths", "mlp_savedmodel", (6,), 4 * 6, "float64"),
    ("keras_paths", "cnn_savedmodel", (6, 6, 1), 3 * 36, "float64"),
    ("keras_paths", "coupling_savedmodel", (4,), 4 * 4 + 4, "float64"),
]


@pytest.mark.parametrize("fixture,key,shape,entries,fd_dtype", CORRECT, ids=[c[1] for c in CORRECT])
def test_correct_models_pass_over_seeds_and_scales(request, fixture, key, shape, entries, fd_dtype):
    model = jacli.load(request.getfixturevalue(fixture)[key])
    rtol = 2e-3 if fd_dtype == "float64" else 1e-2  # FD without float64 widens the tolerance
    for seed in range(20):
        x = (np.random.default_rng(seed).standard_normal((3, *shape)) * SCALES[seed % 4]).astype(np.float32)
        directions = 3 if seed % 5 == 4 else None
        r = jacli.check(model, x, directions=directions, seed=seed)
        doc = r.to_json()
        assert r.passed and doc["failures"] == 0, (seed, doc["mismatches"][:3], doc["adjoint_failures"][:3])
        assert doc["fd_dtype"] == fd_dtype and doc["rtol"] == rtol
        assert doc["checked"] == 3 * (entries if directions is None else 3 * entries // shape_size(shape))
        assert all(s["passed"] for s in doc["samples"]) and len(doc["samples"]) == 3
        # a real margin, not a scrape: every compared entry is far inside its tolerance
        assert doc["worst"]["ratio"] < (0.5 if fd_dtype == "float64" else 1.0)


def shape_size(shape):
    return int(np.prod(shape))


def test_onnx_mlp_passes_once_exact_derivatives_exist(onnx_path, tmp_path):
    x = save_input(tmp_path, np.random.default_rng(0).standard_normal((4, cm.MLP_IN)).astype(np.float32))
    model = jacli.load(onnx_path)
    for seed in range(20):
        xs = (np.random.default_rng(seed).standard_normal((3, cm.MLP_IN)) * SCALES[seed % 4]).astype(np.float32)
        r = jacli.check(model, xs, directions=3 if seed % 5 == 4 else None, seed=seed)
        assert r.passed, (seed, r.to_json()["mismatches"][:3])
        assert r.worst.ratio < 0.5
    code, out = invoke("check", onnx_path, x, "--fd", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["passed"] and doc["format"] == "onnx" and doc["backend"] == "onnxruntime"
    assert doc["fd_dtype"] == "float64", doc["notes"]  # the float64 copy of the graph


# --- broken gradients: fail, and point at the right entries --------------------------------
def test_misplaced_detach_fails_at_exactly_the_detached_entries(torch_paths, tmp_path, capsys):
    x = save_input(tmp_path, np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32))
    code, out, err = run_main(capsys, "check", torch_paths["coupling_detach"], x, "--fd", "--json")
    doc = json.loads(out)
    assert code == 1 and not doc["passed"] and err == ""
    # y2 = x2 * exp(s(x1)).detach() + t(x1): dy2/dx1 lost its exp(s) term; dy/dx2, dy1/dx1, dlogdet/dx are right
    found = {(e["sample"], e["of"], tuple(e["output_index"]), tuple(e["input_index"])) for e in doc["mismatches"]}
    expected = {(s, "output_0", (r,), (c,)) for s in range(3) for r in (2, 3) for c in (0, 1)}
    assert found == expected and doc["failures"] == len(expected) and doc["kinks"] == 0  # none excused nearby
    assert {e["diagnosis"] for e in doc["mismatches"]} == {"wrong-gradient"}
    assert [s["passed"] for s in doc["samples"]] == [False] * 3 and all(s["failures"] == 4 for s in doc["samples"])
    worst = doc["worst"]
    assert worst["of"] == "output_0" and worst["abs_error"] > 10 * worst["allowed"]
    assert abs(worst["fd"] - worst["ad"]) == pytest.approx(worst["abs_error"])

    code, out = invoke("check", torch_paths["coupling_detach"], x, "--fd", "--directions", "4", "--json")
    doc = json.loads(out)
    assert code == 1 and {(e["of"], e["output_index"][0]) for e in doc["mismatches"]} <= {("output_0", 2), ("output_0", 3)}
    assert doc["failures"] > 0 and doc["adjoint_failures"] == []  # JVP and VJP are consistently wrong

    code, out = invoke("check", torch_paths["coupling_detach"], x, "--fd")
    assert code == 1 and "FAILED" in out and "12 wrong" in out
    assert "sample 0, doutput_0[2]/dx[0]: AD" in out and "wrong-gradient" in out


def test_wrong_custom_gradient_in_a_savedmodel_fails_on_its_outputs(custom_gradient_path, tmp_path):
    x = save_input(tmp_path, np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32))
    code, out = invoke("check", custom_gradient_path, x, "--fd", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["format"] == "savedmodel" and doc["fd_dtype"] == "float64" and doc["notes"] == []
    rows = {e["output_index"][0] for e in doc["mismatches"]}
    assert rows == set(cm.CUBE_ROWS)  # only the cube outputs; tanh(x A) is right
    for e in doc["mismatches"]:  # the custom gradient says 2z², the truth is 3z²
        assert e["diagnosis"] == "wrong-gradient" and e["ad"] / e["fd"] == pytest.approx(2 / 3, rel=0.02)
    assert doc["failures"] >= 2 * 3

    code, out = invoke("check", custom_gradient_path, x, "--fd", "--directions", "4", "--json")
    doc = json.loads(out)
    assert code == 1 and {e["output_index"][0] for e in doc["mismatches"]} <= set(cm.CUBE_ROWS)


# --- kinks and leakage -----------------------------------------------------------------------
def test_relu_switch_point_is_a_kink_not_a_bug(torch_paths, weights, tmp_path):
    unit = 2
    x = np.random.default_rng(7).standard_normal((3, cm.MLP_IN)).astype(np.float32)
    x[0] = cm.near_switch(weights, x[0], unit)  # pre-activation ~1e-7: within any FD step of its switch
    z = cm.relu_preactivation(weights, x)
    assert abs(z[0, unit]) < 1e-6 and np.all(np.abs(z[1:]) > 1e-3)
    code, out = invoke("check", torch_paths["relu"], save_input(tmp_path, x), "--fd", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["passed"] and doc["failures"] == 0
    assert doc["kinks"] >= 12 and {e["diagnosis"] for e in doc["unresolved"]} == {"kink"}
    for e in doc["unresolved"]:
        assert e["sample"] == 0  # only the sample at the switch point
        assert abs(weights["W2"][unit, e["output_index"][0]]) > 0 and abs(weights["W1"][e["input_index"][0], unit]) > 0
        side = min(abs(e["ad"] - e["forward_difference"]), abs(e["ad"] - e["backward_difference"]))
        assert side <= 1e-3 * abs(e["ad"])  # AD is the slope on one side of the switch
        assert e["abs_error"] > 0.01 * abs(e["ad"])  # and a naive comparison (rtol 2e-3) would have cried wolf
    assert [s["kinks"] > 0 for s in doc["samples"]] == [True, False, False]

    code, out = invoke("check", torch_paths["relu"], save_input(tmp_path, x), "--fd")
    assert code == 0 and "PASSED" in out and "kink" in out


@pytest.mark.filterwarnings("ignore:std():UserWarning")  # the model's own: a batch of one has no spread
@pytest.mark.parametrize("batch", [1, 4])
def test_batch_statistics_are_reported_as_cross_sample_leakage(torch_paths, tmp_path, batch):
    x = save_input(tmp_path, np.random.default_rng(1).standard_normal((batch, cm.MLP_IN)).astype(np.float32))
    code, out = invoke("check", torch_paths["batchstats"], x, "--fd", "--json")
    doc = json.loads(out)
    assert code == 1 and not doc["passed"] and doc["leakage"] is not None
    assert doc["leakage"]["message"].startswith("cross-sample leakage") and doc["samples"] == []
    assert 0 <= doc["leakage"]["sample"] < batch
    if batch == 4:  # the exit code of the real process, and the terminal report
        code, out, err = run_cli("check", torch_paths["batchstats"], x, "--fd")
        assert code == 1 and err == "" and "cross-sample leakage" in out and "--no-batch" in out


# --- the command line contract ----------------------------------------------------------------
def test_cli_pass_json_report_and_exit_codes(torch_paths, tmp_path, capsys):
    x = save_input(tmp_path, np.random.default_rng(0).standard_normal((2, cm.MLP_IN)).astype(np.float32))
    code, out, err = run_main(capsys, "check", torch_paths["mlp"], x, "--fd", "--json")
    doc = json.loads(out)
    assert code == 0 and err == ""
    assert doc["passed"] is True and doc["model"] == str(torch_paths["mlp"])
    assert (doc["format"], doc["backend"]) == ("torchscript", "torch")
    for key in ("max_abs_error", "max_rel_error", "worst", "samples", "rtol", "atol", "eps", "leakage"):
        assert key in doc
    assert [s["index"] for s in doc["samples"]] == [0, 1] and all(s["passed"] for s in doc["samples"])
    assert doc["max_abs_error"] < 1e-5 and doc["max_rel_error"] < doc["rtol"]

    # a tolerance no float32 AD can meet: --rtol/--atol are honoured
    code, out = invoke("check", torch_paths["mlp"], x, "--fd", "--json", "--rtol", "1e-12", "--atol", "0")
    doc = json.loads(out)
    assert code == 1 and doc["rtol"] == 1e-12 and doc["atol"] == 0 and doc["failures"] > 0

    code, out = invoke("check", torch_paths["mlp"], x, "--fd", "--json", "--eps", "1e-4")
    assert code == 0 and json.loads(out)["eps"] == 1e-4


@pytest.mark.parametrize("args,message", [
    ([], "--fd"),
    (["--fd", "--eps", "0"], "--eps"),
    (["--fd", "--directions", "0"], "--directions"),
    (["--fd", "--rtol", "-1"], "--rtol"),
])
def test_cli_bad_usage_is_one_error_line_and_exit_2(torch_paths, tmp_path, args, message):
    x = save_input(tmp_path, np.zeros((1, cm.MLP_IN), np.float32))
    code, out, err = run_cli("check", torch_paths["mlp"], x, *args)
    assert code == 2 and out == ""
    assert err.startswith("Error:") and err.count("\n") == 1 and message in err and "Traceback" not in err


def test_cli_bad_input_shape_exits_2(keras_paths, tmp_path, capsys):
    x = save_input(tmp_path, np.zeros((2, 5), np.float32))
    code, out, err = run_main(capsys, "check", keras_paths["mlp.keras"], x, "--fd")
    assert code == 2 and out == "" and err.startswith("Error:") and err.count("\n") == 1


# --- the engine on numpy models: error estimates, fallbacks, leakage, the adjoint test -------
class Tanh(Model):
    """y = tanh(x W) — with ``pairs``, of x_i + x_(i xor 1), mixing samples pairwise; with
    ``noise``, plus noise — with hand-written VJP/JVP (optionally a wrong VJP) and an
    optional float64 path."""

    W = np.random.default_rng(2).standard_normal((3, 2))

    def __init__(self, pairs=False, noise=False, wrong_vjp=False, forward64=None):
        super().__init__(path="numpy", format="numpy", backend="numpy",
                         inputs=[TensorSpec("x", (None, 3), "float32")], outputs=[TensorSpec("y", (None, 2), "float32")],
                         supports_float64=forward64 is not None)
        self.pairs, self.noise, self.wrong_vjp, self.f64 = pairs, noise, wrong_vjp, forward64

    def _f(self, x):
        x = x + x[np.arange(len(x)) ^ 1] if self.pairs else x
        y = np.tanh(x @ self.W)
        return y + 1e-3 * np.random.standard_normal(y.shape) if self.noise else y

    def _forward(self, xs):
        return {"y": self._f(xs["x"]).astype(np.float32)}

    def _forward64(self, xs):
        return self.f64(self, xs)

    def _vjp(self, xs, cts, wrt):
        d = 1 - np.tanh(xs["x"] @ self.W) ** 2
        g = (cts["y"] * d) @ self.W.T
        return {"x": (g * (1.5 if self.wrong_vjp else 1)).astype(np.float32)}

    def _jvp(self, xs, ts, of):
        d = 1 - np.tanh(xs["x"] @ self.W) ** 2
        return {"y": (d * (ts["x"] @ self.W)).astype(np.float32)}


def exact64(model, xs):
    return {"y": np.tanh(xs["x"].astype(np.float64) @ model.W)}


X = np.random.default_rng(4).standard_normal((4, 3)).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_richardson_error_estimates_bound_the_actual_error(dtype):
    def f(xs):  # per sample: y_i = sin(x_i) exp(x_i / 3), derivative known in closed form
        x = xs["x"]
        return {"y": (np.sin(x) * np.exp(x / 3)).astype(x.dtype)}

    x = np.random.default_rng(0).uniform(-4, 4, (200, 5)).astype(dtype)
    x64 = x.astype(np.float64)
    exact = np.cos(x64) * np.exp(x64 / 3) + np.sin(x64) * np.exp(x64 / 3) / 3
    f0 = {"y": f({"x": x})["y"].astype(np.float64)}
    value, error = np.zeros_like(x64), np.zeros_like(x64)
    for c0, c1, est in estimate_columns(f, {"x": x}, "x", ["y"], np.dtype(dtype), float(np.cbrt(np.finfo(dtype).eps)), f0):
        idx = np.arange(c0, c1)
        value[:, idx] = est["y"].value[:, idx, np.arange(c1 - c0)]
        error[:, idx] = est["y"].error[:, idx, np.arange(c1 - c0)]
    actual = np.abs(value - exact)
    assert np.mean(actual <= error) >= 0.99  # honest: the estimate bounds the true error
    assert np.median(error / np.maximum(np.abs(exact), 1e-3)) < (1e-7 if dtype == np.float64 else 1e-3)  # and tight


def test_float64_path_failing_or_disagreeing_falls_back_to_native_fd():
    def broken(model, xs):
        raise ImportError("cannot import name 'to_float64'")

    r = jacli.check(Tanh(forward64=broken), X)
    assert r.passed and r.tolerance.fd_dtype == "float32" and r.tolerance.rtol == 1e-2
    assert "float64 evaluation failed (ImportError" in r.notes[0]

    r = jacli.check(Tanh(forward64=lambda m, xs: {"y": exact64(m, xs)["y"] + 0.1}), X)
    assert r.tolerance.fd_dtype == "float32" and "differs from the model's" in r.notes[0]

    r = jacli.check(Tanh(forward64=exact64), X)
    assert r.passed and r.tolerance.fd_dtype == "float64" and r.tolerance.rtol == 2e-3 and r.notes == []


def test_leakage_within_the_batch_is_found_by_splitting_on_index_bits():
    model = Tanh(pairs=True)  # y_i depends on x_(i xor 1): invisible when copies are appended
    leak = chk.leakage(model, jacli.api.plan(model, X))
    assert leak is not None and leak.perturbed is not None and leak.sample not in leak.perturbed
    assert (leak.sample ^ 1) in leak.perturbed
    assert chk.leakage(Tanh(), jacli.api.plan(Tanh(), X)) is None


def test_nondeterministic_model_is_refused():
    with pytest.raises(UnsupportedError, match="not deterministic"):
        jacli.check(Tanh(noise=True), X)


def test_wrong_vjp_right_jvp_caught_by_the_dot_product_test():
    r = jacli.check(Tanh(wrong_vjp=True, forward64=exact64), X, directions=3)
    doc = r.to_json()
    assert not r.passed and doc["mismatches"] == []  # J·v by JVP agrees with FD ...
    assert len(doc["adjoint_failures"]) == 4 * 3  # ... but <Jv, c> ≠ <v, Jᵀc> for every sample and direction
    a = doc["adjoint_failures"][0]
    assert a["vjp"] / a["jvp"] == pytest.approx(1.5, rel=1e-3)
    assert not jacli.check(Tanh(wrong_vjp=True, forward64=exact64), X).passed  # reverse-mode columns see it too


def test_default_tolerances_by_dtype_and_validation():
    assert chk.tolerance("float32", "float64").rtol == 2e-3
    assert chk.tolerance("float32", "float32").rtol == 1e-2
    assert chk.tolerance("float64", "float64").rtol == 1e-6
    assert chk.tolerance("float16", "float32").rtol == 5e-2
    t = chk.tolerance("float32", "float64")
    assert t.eps == pytest.approx(np.cbrt(np.finfo(np.float64).eps)) and t.atol is None
    with pytest.raises(InputError):
        chk.tolerance("float32", "float64", eps=2.0)
    with pytest.raises(InputError):
        chk.tolerance("float32", "float64", rtol=-1.0)


def test_progress_moves_by_fd_columns_within_one_sample():
    """One sample of the sample MLP's 500 inputs, its FD columns in several blocks (a small
    budget): the progress advances in fractions of that sample, block by block, and adds up
    to it (it moved once, at the end, when a sample's columns took minutes on an image network)."""
    x = np.random.default_rng(0).standard_normal((1, 500)).astype(np.float32)
    told = []
    r = jacli.check(jacli.load(str(SAMPLES / "mlp.onnx")), x, max_memory=16 << 20,
                    progress=told.append)
    assert r.passed
    assert len([t for t in told if t > 0]) >= 3, told  # more than one step for the one sample
    assert all(0 <= t <= 1 for t in told) and abs(sum(told) - 1) < 1e-9, told


def test_a_long_check_of_every_entry_says_so_first(monkeypatch, tmp_path):
    """The expected seconds of FD of every entry, past ``LONG``, are said before the work
    (one line, naming --directions); never with --directions, nor for a check that is quick."""
    x = np.random.default_rng(0).standard_normal((2, 500)).astype(np.float32)
    model = jacli.load(str(SAMPLES / "mlp.onnx"))
    heard = []
    jacli.check(model, x, notice=heard.append)
    assert heard == []  # 2 x 500 x 4 forward evaluations of a small MLP: well under a minute
    monkeypatch.setattr(columns, "LONG", 0.0)
    jacli.check(model, x, notice=heard.append)
    assert len(heard) == 1 and "500 input elements x 4 forward passes, 2 samples" in heard[0], heard
    assert "--directions K" in heard[0]
    jacli.check(model, x, directions=2, notice=heard.append)
    assert len(heard) == 1
    np.save(tmp_path / "x.npy", x)
    r = run_jacli("check", SAMPLES / "mlp.onnx", tmp_path / "x.npy", "--fd", "--json")
    lines = [line for line in r.stderr.splitlines() if line]
    assert r.code == 0 and len(lines) == 1 and lines[0].startswith("Warning: checking every entry takes about"), lines
    assert json.loads(r.out)["passed"]
    r = run_jacli("check", SAMPLES / "mlp.onnx", tmp_path / "x.npy", "--fd", "--json", "--quiet")
    assert r.code == 0 and r.stderr == ""
