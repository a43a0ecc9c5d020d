"""svd / det: closed forms, singular Jacobians, a normalizing flow's own log-det,
matrix-free against full SVD, a Jacobian too large to form, and the CLI contract."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jacli
from jacli import api

import torch
nn = torch.nn


def _strict(text: str):
    """json.loads that refuses the non-standard NaN/Infinity literals."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON literal {c}"))


# --- models ------------------------------------------------------------------------------
class Map2d(nn.Module):
    """f(x, y) = (x² - y², 2xy): J = [[2x, -2y], [2y, 2x]], det 4(x² + y²), both σ = 2√(x² + y²)."""

    def forward(self, x):
        a, b = x[:, 0], x[:, 1]
        return torch.stack([a * a - b * b, 2 * a * b], 1)


class Softmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x, -1)


class Scale(nn.Module):
    """y = x * s: J wrt x is s·I (det s^n), wrt s a column; the whole J is n x (n + 1)."""

    def forward(self, x, s):
        return x * s


class Coupling(nn.Module):
    """RealNVP affine coupling: the masked half passes through, the rest is scaled by
    exp(s(x_masked)) and shifted by t(x_masked); its log-det is the sum of s."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)
        n = len(mask)
        self.net = nn.Sequential(nn.Linear(n, 16), nn.Tanh(), nn.Linear(16, 2 * n))

    def forward(self, x):
        xm = x * self.mask
        s, t = self.net(xm).chunk(2, -1)
        s = torch.tanh(s) * (1 - self.mask)
        return xm + (1 - self.mask) * (x * torch.exp(s) + t * (1 - self.mask)), s.sum(-1)


class Flow(nn.Module):
    """Four couplings with alternating masks, then a sign flip of one coordinate
    (det sign -1, log|det| unchanged). Returns (y, its own log|det dy/dx|)."""

    def __init__(self, n):
        super().__init__()
        masks = [(torch.arange(n) % 2 == i % 2).float() for i in range(4)]
        self.layers = nn.ModuleList([Coupling(m) for m in masks])
        flip = torch.ones(n)
        flip[0] = -1
        self.register_buffer("flip", flip)

    def forward(self, x):
        logdet = torch.zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x * self.flip, logdet


def _mlp(n, hidden, m):
    return nn.Sequential(nn.Linear(n, hidden), nn.Tanh(), nn.Linear(hidden, m), nn.Tanh())


class Residual(nn.Module):
    """x + tanh(W x) / 2 on 300 features: a square J with condition number about 2."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(300, 300)

    def forward(self, x):
        return x + 0.5 * torch.tanh(self.lin(x))


class Conv(nn.Module):
    """(B, 2, 6, 6) -> (B, 3, 6, 6): J is 108 x 72, inputs and outputs with image shapes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x) + 0.1 * x.sum(1, keepdim=True))


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("spectral")
    built = {"map2d": Map2d(), "softmax": Softmax(), "scale": Scale(), "flow": Flow(8), "conv": Conv(),
             "wide": _mlp(400, 320, 300), "tall": _mlp(120, 200, 500), "square": Residual()}
    paths = {}
    for name, module in built.items():
        paths[name] = str(d / f"{name}.pt")
        torch.jit.save(torch.jit.script(module.eval()), paths[name])
    rng = np.random.default_rng(0)
    inputs = {
        "map2d": np.array([[1.5, 0.5], [2.0, -1.0]], np.float32),
        "softmax": rng.standard_normal((3, 6)).astype(np.float32),
        "flow": rng.standard_normal((5, 8)).astype(np.float32),
        "conv": rng.standard_normal((2, 2, 6, 6)).astype(np.float32),
        "wide": rng.standard_normal((2, 400)).astype(np.float32),
        "tall": rng.standard_normal((2, 120)).astype(np.float32),
        "square": rng.standard_normal((2, 300)).astype(np.float32),
    }
    for name, x in inputs.items():
        np.save(d / f"{name}.npy", x)
        paths[f"{name}_x"] = str(d / f"{name}.npy")
    np.savez(d / "scale.npz", x=rng.standard_normal((3, 401)).astype(np.float32),
             s=np.array([[10.0], [0.1], [-1.5]], np.float32))
    paths["scale_x"] = str(d / "scale.npz")
    paths["dir"] = d
    return paths


@pytest.fixture
def run(jacli):
    """The real CLI entry point, in process (conftest's ``jacli`` fixture)."""
    return jacli


def _load(models, name):
    return jacli.load(models[name]), np.load(models[f"{name}_x"])


# --- closed forms --------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["full", "matrix-free"])
def test_map2d_singular_values_closed_form(models, solver):
    model, x = _load(models, "map2d")
    r = jacli.svd(model, x, solver=solver, k=2 if solver == "matrix-free" else None)
    want = 2 * np.sqrt((x.astype(np.float64) ** 2).sum(1))  # √10 and √20
    assert np.allclose(want[0], np.sqrt(10))
    np.testing.assert_allclose(r.singular_values, np.stack([want, want], 1), rtol=1e-6)
    assert r.solver == solver


def test_map2d_determinant_closed_form(models):
    model, x = _load(models, "map2d")
    r = jacli.det(model, x)
    np.testing.assert_allclose(r.det, [10.0, 20.0], rtol=1e-6)
    np.testing.assert_allclose(r.logabsdet, np.log([10.0, 20.0]), rtol=1e-6)
    assert list(r.sign) == [1, 1] and not r.singular.any()


def test_no_batch_treats_the_batch_as_one_vector(models):
    """Two samples as one 4-vector: J is block diagonal, det = 10 * 20."""
    model, x = _load(models, "map2d")
    r = jacli.det(model, x, batch=False)
    np.testing.assert_allclose(r.det, [200.0], rtol=1e-6)
    s = jacli.svd(model, x, batch=False)
    np.testing.assert_allclose(s.singular_values[0], [np.sqrt(20)] * 2 + [np.sqrt(10)] * 2, rtol=1e-6)


def test_no_batch_output_file_keeps_a_sample_axis_of_one(models, run, tmp_path):
    import h5py

    target = tmp_path / "nb.h5"
    out = run("svd", models["map2d"], models["map2d_x"], "--no-batch", "-k", "3", "--smallest", "--solver",
              "matrix-free", "--vectors", "-o", target, "-q")
    assert out.code == 0, out.stderr
    with h5py.File(target) as f:
        np.testing.assert_allclose(f["singular_values"][()], [[np.sqrt(20)] * 2 + [np.sqrt(10)]], rtol=1e-6)
        np.testing.assert_allclose(f["condition_number"][()], [np.sqrt(2)], rtol=1e-6)
        assert f["right_vectors/x"].shape == (1, 3, 2, 2) and f["left_vectors/output"].shape == (1, 3, 2, 2)


# --- singular Jacobians --------------------------------------------------------------------
def test_softmax_is_singular_not_a_tiny_determinant(models, run):
    out = run("det", models["softmax"], models["softmax_x"], "--json")
    assert out.code == 0, out.stderr
    doc = _strict(out.out)
    for s in doc["samples"]:
        assert s["singular"] is True
        assert (s["sign"], s["det"], s["logabsdet"]) == (0, 0, "-Infinity")
        assert s["condition_number"] == "Infinity" and s["rcond"] < 1e-6  # as svd finds it: rank deficient
    assert doc["summary"]["singular"] == 3 and doc["summary"]["logabsdet"]["max"] == "-Infinity"


def test_softmax_svd_rank_and_condition(models, run):
    """softmax's Jacobian diag(p) - ppᵀ has rank n - 1 (the null vector is all-ones)."""
    doc = _strict(run("svd", models["softmax"], models["softmax_x"], "--json").out)
    model, x = _load(models, "softmax")
    p = np.exp(x.astype(np.float64)) / np.exp(x.astype(np.float64)).sum(1, keepdims=True)
    ref = np.linalg.svd(np.einsum("bi,ij->bij", p, np.eye(6)) - p[:, :, None] * p[:, None, :], compute_uv=False)
    for s, want in zip(doc["samples"], ref, strict=True):
        assert s["rank"] == 5 and s["condition_number"] == "Infinity"
        np.testing.assert_allclose(s["singular_values"][:5], want[:5], rtol=1e-5)
    assert doc["summary"]["condition_number"]["median"] == "Infinity"


def test_matrix_free_smallest_reports_softmax_as_rank_deficient(models):
    model, x = _load(models, "softmax")
    r = jacli.svd(model, x, k=2, smallest=True, solver="matrix-free")
    assert np.all(r.condition_number == np.inf)
    assert np.all(r.smallest[:, -1] <= r.smallest_error_bound[:, -1])  # σ_min cannot be told apart from 0


@pytest.mark.parametrize("cmd", [["det"], ["svd"], ["svd", "-k", "1", "--smallest", "--solver", "matrix-free"]])
def test_a_nan_sample_gives_nan_and_leaves_the_others_alone(models, run, tmp_path, cmd):
    x = np.load(models["map2d_x"])
    x[1, 0] = np.nan
    np.save(tmp_path / "nan.npy", x)
    out = run(*cmd[:1], models["map2d"], tmp_path / "nan.npy", *cmd[1:], "--json")
    assert out.code == 0 and "NaN/Inf" in out.stderr and "converge" not in out.stderr
    good, bad = _strict(out.out)["samples"]
    key = "logabsdet" if cmd[0] == "det" else "condition_number"
    assert bad[key] == "NaN" and good[key] == pytest.approx(np.log(10) if cmd[0] == "det" else 1.0)


# --- normalizing flow ---------------------------------------------------------------------
def test_flow_logabsdet_equals_the_flows_own(models):
    model, x = _load(models, "flow")
    own = model.forward({"x": x})["output_1"].astype(np.float64)
    r = jacli.det(model, x, of="output_0")
    assert np.ptp(own) > 0.1  # the samples differ, so agreement is not a coincidence
    np.testing.assert_allclose(r.logabsdet, own, atol=2e-5)
    assert np.all(r.sign == -1)  # the flip of one coordinate
    np.testing.assert_allclose(r.det, -np.exp(own), rtol=1e-4)


def test_flow_svd_agrees_with_det(models):
    """|det J| = Π σᵢ: the SVD and the LU agree on the flow."""
    model, x = _load(models, "flow")
    s = jacli.svd(model, x, of="output_0")
    d = jacli.det(model, x, of="output_0")
    np.testing.assert_allclose(np.log(s.singular_values).sum(1), d.logabsdet, atol=1e-5)


# --- huge and tiny determinants ---------------------------------------------------------------
def test_det_beyond_float64_range(models, run):
    """det(s·I₄₀₁) = s^401: 10^401 overflows and 0.1^401 underflows float64, but log|det| is
    exact; (-1.5)^401 is an ordinary negative number."""
    out = run("det", models["scale"], models["scale_x"], "--wrt", "x", "--json")
    assert out.code == 0, out.stderr
    doc = _strict(out.out)
    want = 401 * np.log([10.0, 0.1, 1.5])
    got = [s["logabsdet"] for s in doc["samples"]]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    a, b, c = doc["samples"]
    assert a["det"] == "Infinity" and a["det_overflow"] and a["sign"] == 1 and not a["singular"]
    assert b["det"] == 0 and b["det_underflow"] and b["sign"] == 1 and not b["singular"]
    assert c["sign"] == -1 and np.isclose(c["det"], -(1.5**401), rtol=1e-5)
    assert "overflows" in out.stderr or "exceeds" in out.stderr


def test_det_of_a_non_square_jacobian_is_an_error(models, run, tmp_path):
    target = tmp_path / "det.npz"
    out = run("det", models["scale"], models["scale_x"], "-o", target)  # wrt x and s: 401 x 402
    assert out.code == 2
    assert out.stderr.startswith("Error:") and out.stderr.count("\n") == 1
    assert "401x402" in out.stderr and "svd" in out.stderr
    assert not target.exists() and not list(tmp_path.iterdir())


# --- matrix-free against the full SVD ---------------------------------------------------------
def _full_svd(model, x):
    J = api.jacobian(model, x).astype(np.float64)  # the block-wise engine: an independent path
    return np.linalg.svd(J.reshape(len(x), J.shape[1], -1), compute_uv=False)


@pytest.mark.parametrize("name, smallest, memory", [
    ("wide", False, None),  # 300 x 400: the Krylov basis lives in the output space (A = VJP)
    ("tall", True, None),  # 500 x 120: in the input space (A = JVP)
    ("square", True, 4 << 20),  # 300 x 300 with a small budget: the basis restarts
])
def test_matrix_free_agrees_with_full_svd(models, name, smallest, memory):
    model, x = _load(models, name)
    r = jacli.svd(model, x, k=4, smallest=smallest, solver="matrix-free", max_memory=memory or 1 << 30)
    ref = _full_svd(model, x)
    assert r.converged.all() and r.iterations > 1
    np.testing.assert_allclose(r.singular_values, ref[:, :4], rtol=1e-4)
    assert np.all(np.abs(r.singular_values - ref[:, :4]) <= r.error_bound + 1e-6 * ref[:, :1])  # bounds hold
    if smallest:
        np.testing.assert_allclose(r.smallest, ref[:, -4:], rtol=1e-4)
        np.testing.assert_allclose(r.condition_number, ref[:, 0] / ref[:, -1], rtol=1e-4)
    else:
        assert np.isnan(r.condition_number).all()


def test_singular_vectors_in_the_inputs_shape(models, run, tmp_path):
    """The written vectors are singular triplets of the real J: J v = σ u and Jᵀu = σ v,
    with v shaped like the input (an image) and u like the output."""
    model, x = _load(models, "conv")
    J = api.jacobian(model, x).astype(np.float64).reshape(2, 108, 72)
    for solver in ("full", "matrix-free"):
        out = tmp_path / f"{solver}.npz"
        res = run("svd", models["conv"], models["conv_x"], "-k", "2", "--solver", solver, "--vectors", "-o", out)
        assert res.code == 0, res.stderr
        f = np.load(out)
        v, u, s = f["right_vectors/x"], f["left_vectors/output"], f["singular_values"]
        assert v.shape == (2, 2, 2, 6, 6) and u.shape == (2, 2, 3, 6, 6) and s.shape == (2, 2)
        v, u = v.reshape(2, 2, 72), u.reshape(2, 2, 108)
        Jv = np.einsum("bmn,bkn->bkm", J, v)
        Jtu = np.einsum("bmn,bkm->bkn", J, u)
        np.testing.assert_allclose(Jv, s[:, :, None] * u, atol=1e-5 * s.max())
        np.testing.assert_allclose(Jtu, s[:, :, None] * v, atol=1e-5 * s.max())
        np.testing.assert_allclose(np.linalg.norm(v, axis=2), 1, rtol=1e-6)
        meta = json.loads(str(f["jacli_meta"]))
        assert meta["command"] == "svd" and meta["solver"] == solver and meta["model_sha256"]


# --- a Jacobian too large to form ---------------------------------------------------------------
BIG = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch, jacli

    torch.manual_seed(0)
    class Big(torch.nn.Module):  # 10^5 inputs -> rank-64 bottleneck -> 10^4 outputs
        def __init__(self):
            super().__init__()
            self.down = torch.nn.Linear(100_000, 64)
            self.up = torch.nn.Linear(64, 10_000)
            with torch.no_grad():  # a decaying spectrum
                self.down.weight *= torch.logspace(0, -2, 64)[:, None]
        def forward(self, x):
            return torch.sin(self.up(torch.tanh(self.down(x))))
    path = sys.argv[1] + "/big.pt"
    torch.jit.save(torch.jit.script(Big()), path)
    x = np.random.default_rng(0).standard_normal((1, 100_000)).astype(np.float32)
    model = jacli.load(path)
    plan = jacli.api.plan(model, x)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = jacli.svd(model, plan, k=3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # reference from the factors: J = diag(cos z) W2 diag(1 - g²) W1 = A W1
    m = torch.jit.load(path)
    W1, b1 = m.down.weight.detach().double().numpy(), m.down.bias.detach().double().numpy()
    W2, b2 = m.up.weight.detach().double().numpy(), m.up.bias.detach().double().numpy()
    g = np.tanh(W1 @ x[0].astype(np.float64) + b1)
    A = np.cos(W2 @ g + b2)[:, None] * W2 * (1 - g**2)[None, :]
    ref = np.linalg.svd(np.linalg.qr(A)[1] @ np.linalg.qr(W1.T)[1].T, compute_uv=False)[:3]
    print(json.dumps({"solver": r.solver, "values": r.singular_values[0].tolist(), "ref": ref.tolist(),
                      "growth_kib": peak - base, "converged": bool(r.converged.all())}))
""")


def test_matrix_free_on_a_jacobian_too_large_to_form(tmp_path):
    """J is 10⁴ x 10⁵ (4 GB in float32); top-3 singular values within bounded memory."""
    script = tmp_path / "big.py"  # a file, so that TorchScript can read the module's source
    script.write_text(BIG)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["solver"] == "matrix-free" and doc["converged"]
    np.testing.assert_allclose(doc["values"], doc["ref"], rtol=1e-4)
    assert doc["growth_kib"] * 1024 < 0.5e9  # far below m·n·4 bytes = 4 GB


# --- solver choice, CLI contract -----------------------------------------------------------------
def test_auto_solver_full_when_small_matrix_free_when_not(models, run):
    small = _strict(run("svd", models["tall"], models["tall_x"], "--json").out)
    assert small["solver"] == "full" and len(small["samples"][0]["singular_values"]) == 120
    assert small["samples"][0]["rank"] == 120
    big = run("svd", models["tall"], models["tall_x"], "--json", "--max-memory", "1M")  # J: 500x120 float64 x 3
    assert big.code == 0, big.stderr
    doc = _strict(big.out)
    assert doc["solver"] == "matrix-free" and len(doc["samples"][0]["singular_values"]) == 6
    assert "too large" in big.stderr
    np.testing.assert_allclose(doc["samples"][0]["singular_values"], small["samples"][0]["singular_values"][:6],
                               rtol=1e-4)
    assert doc["samples"][0]["condition_number"] == "NaN"  # σ_min unknown without --smallest


def test_svd_json_contract_and_summary(models, run):
    out = run("svd", models["flow"], models["flow_x"], "--of", "output_0", "--json")
    assert out.code == 0, out.stderr
    doc = _strict(out.out)
    assert {"model", "format", "backend", "samples", "summary"} <= set(doc)
    assert (doc["format"], doc["backend"], doc["shape"]) == ("torchscript", "torch", [8, 8])
    smax = [s["singular_values"][0] for s in doc["samples"]]
    cond = [s["condition_number"] for s in doc["samples"]]
    assert len(smax) == 5 and all(set(s) >= {"singular_values", "condition_number"} for s in doc["samples"])
    assert doc["summary"]["sigma_max"]["max"] == pytest.approx(max(smax))
    assert doc["summary"]["sigma_max"]["median"] == pytest.approx(float(np.median(smax)))
    assert doc["summary"]["condition_number"]["median"] == pytest.approx(float(np.median(cond)))
    full = run("svd", models["flow"], models["flow_x"], "--of", "output_0").out
    assert f"σ_max over 5 samples: max {max(smax):.6g}" in full and "condition number over 5 samples" in full
    free = run("svd", models["flow"], models["flow_x"], "--of", "output_0", "-k", "2", "--solver", "matrix-free").out
    assert "matrix-free" in free and "±bound" in free and f"max {max(smax):.6g}" in free


def test_det_json_contract_and_terminal_summary(models, run):
    doc = _strict(run("det", models["flow"], models["flow_x"], "--of", "output_0", "--json").out)
    assert {"model", "format", "backend", "samples", "summary"} <= set(doc)
    lads = [s["logabsdet"] for s in doc["samples"]]
    assert all(set(s) >= {"sign", "logabsdet", "det"} for s in doc["samples"])
    assert doc["summary"]["logabsdet"]["max"] == pytest.approx(max(lads))
    assert doc["summary"]["logabsdet"]["median"] == pytest.approx(float(np.median(lads)))
    text = run("det", models["flow"], models["flow_x"], "--of", "output_0").out
    assert "log|det J| over 5 samples" in text and f"{max(lads):.6g}" in text


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_output_files_carry_metadata(models, run, tmp_path, suffix):
    import h5py

    target = tmp_path / f"det{suffix}"
    out = run("det", models["flow"], models["flow_x"], "--of", "output_0", "-o", target, "-q")
    assert out.code == 0 and out.out == "", out.stderr
    model, x = _load(models, "flow")
    want = jacli.det(model, x, of="output_0")
    if suffix == ".npz":
        f = np.load(target)
        arrays, meta = {k: f[k] for k in ("sign", "logabsdet", "det", "rcond")}, json.loads(str(f["jacli_meta"]))
    else:
        with h5py.File(target) as f:
            arrays, meta = {k: f[k][()] for k in ("sign", "logabsdet", "det", "rcond")}, dict(f.attrs)
    np.testing.assert_allclose(arrays["logabsdet"], want.logabsdet)
    np.testing.assert_array_equal(arrays["sign"], want.sign)
    assert meta["command"] == "det" and meta["format"] == "torchscript" and len(meta["model_sha256"]) == 64
    assert meta["singular_rule"].startswith("sigma_min <= 4*eps*||J||_F (eps = 1.19209e-07")


@pytest.mark.parametrize("args, message", [
    (["svd", "map2d", "-k", "3"], "-k 3"),
    (["svd", "map2d", "--vectors"], "-o"),
    (["svd", "map2d", "-o", "{tmp}/s.npy"], ".npz or .h5"),
    (["svd", "map2d", "-o", "-"], ".npz or .h5"),
    (["svd", "wide", "--solver", "matrix-free", "--method", "fd"], "automatic differentiation"),
    (["svd", "wide", "--solver", "full", "--max-memory", "1M"], "-k"),
    (["det", "wide"], "svd"),
])
def test_bad_requests_exit_2_with_one_line(models, run, tmp_path, args, message):
    cmd, name, *rest = args
    out = run(cmd, models[name], models[f"{name}_x"], *[a.format(tmp=tmp_path) for a in rest])
    assert out.code == 2 and out.out == ""
    assert out.stderr.startswith("Error:") and out.stderr.count("\n") == 1 and message in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_entry_point_exit_codes(models):
    ok = subprocess.run([sys.executable, "-m", "jacli", "det", models["map2d"], models["map2d_x"], "--json"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and [s["det"] for s in _strict(ok.stdout)["samples"]] == pytest.approx([10, 20])
    bad = subprocess.run([sys.executable, "-m", "jacli", "det", models["softmax"][:-3] + "missing.pt",
                          models["map2d_x"]], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("Error:") and "Traceback" not in bad.stderr


# --- ONNX -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def onnx_models(tmp_path_factory):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = tmp_path_factory.mktemp("spectral_onnx")

    def save(name, nodes, inits, width_in, width_out):
        graph = helper.make_graph(
            nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", width_in])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", width_out])],
            [numpy_helper.from_array(v, k) for k, v in inits.items()])
        path = str(d / f"{name}.onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        return path

    map2d = save("map2d", [
        helper.make_node("MatMul", ["x", "ex"], ["a"]), helper.make_node("MatMul", ["x", "ey"], ["b"]),
        helper.make_node("Mul", ["a", "a"], ["a2"]), helper.make_node("Mul", ["b", "b"], ["b2"]),
        helper.make_node("Sub", ["a2", "b2"], ["re"]), helper.make_node("Mul", ["a", "b"], ["ab"]),
        helper.make_node("Add", ["ab", "ab"], ["im"]), helper.make_node("Concat", ["re", "im"], ["y"], axis=1),
    ], {"ex": np.array([[1], [0]], np.float32), "ey": np.array([[0], [1]], np.float32)}, 2, 2)
    softmax = save("softmax", [helper.make_node("Softmax", ["x"], ["y"], axis=-1)], {}, 6, 6)
    return {"map2d": map2d, "softmax": softmax}


@pytest.mark.parametrize("method", ["ad", "fd"])
def test_onnx_determinants(models, onnx_models, method):
    r = jacli.det(jacli.load(onnx_models["map2d"]), np.load(models["map2d_x"]), method=method)
    np.testing.assert_allclose(r.det, [10.0, 20.0], rtol=1e-6 if method == "ad" else 1e-4)
    soft = jacli.det(jacli.load(onnx_models["softmax"]), np.load(models["softmax_x"]), method=method)
    assert soft.singular.all() and np.all(soft.logabsdet == -np.inf)
