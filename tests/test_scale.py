"""Scale: Jacobians larger than the memory budget stream to disk in bounded memory; sizes
that cannot fit are refused before any work; the progress bar is driven by samples done."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, SAMPLES, mlp_jacobian

import jacli
from jacli.engine import jacobian as jac
from jacli.errors import InputError, OutputError
from jacli.render.progress import Progress

MiB = 1 << 20
BIG = 20_000  # samples: a 400 MB Jacobian (10 x 500 float32 each)


def peak_rss(*args: str) -> tuple[int, str]:
    """Peak resident memory (bytes) of ``python -m jacli ARGS`` run as a child of a fresh
    interpreter (so no other child of this test process is counted), and its stderr."""
    code = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run([sys.executable, '-m', 'jacli', *sys.argv[1:]], capture_output=True, text=True)\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
        "sys.stderr.write(r.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, check=True)
    rc, rss = map(int, r.stdout.split())
    assert rc == 0, r.stderr
    return rss, r.stderr


@pytest.fixture(scope="session")
def big_input(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    x = np.random.default_rng(3).standard_normal((BIG, 500)).astype(np.float32)
    np.save(d / "big.npy", x)
    np.save(d / "small.npy", x[:100])
    return d, x


@pytest.fixture(scope="session")
def baseline_rss(big_input):
    d, _ = big_input
    rss, _ = peak_rss("compute", str(SAMPLES / "mlp.onnx"), str(d / "small.npy"), "-o", str(d / "small.h5"), "-q")
    return rss


@pytest.mark.parametrize("ext", ["h5", "npy", "npz"])
def test_jacobian_larger_than_budget_streams_in_bounded_memory(big_input, baseline_rss, weights, ext):
    d, x = big_input
    budget = 256 * MiB
    out = d / f"J.{ext}"
    rss, err = peak_rss("compute", str(SAMPLES / "mlp.onnx"), str(d / "big.npy"), "-o", str(out), "-q",
                        "--max-memory", "256M")
    assert err == ""
    grown = rss - baseline_rss  # over the same command on 100 samples: input, buffers, model work
    jacobian_bytes = BIG * 10 * 500 * 4
    assert grown < budget and grown < jacobian_bytes / 2, (rss / MiB, baseline_rss / MiB)
    if ext == "h5":
        import h5py

        with h5py.File(out) as f:
            J = f["dprobs/dx"]
            assert J.shape == (BIG, 10, 500) and J.chunks is not None
            picks = [0, 1234, BIG - 1]
            got = np.stack([J[i] for i in picks])
    else:
        J = np.load(out, mmap_mode="r") if ext == "npy" else np.load(out)["dprobs/dx"]
        assert J.shape == (BIG, 10, 500)
        picks = [0, 1234, BIG - 1]
        got = np.asarray(J[picks])
    np.testing.assert_allclose(got, mlp_jacobian(weights, x[picks]), atol=2e-5)
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []  # no scratch files left


def test_sample_blocks_and_seed_blocks_follow_the_budget(weights, monkeypatch):
    model = jacli.load(str(SAMPLES / "mlp.onnx"))
    x = np.random.default_rng(0).standard_normal((300, 500)).astype(np.float32)
    p = jacli.api.plan(model, x)
    assert jac.sample_block(p, budget=1 * MiB) == (MiB // 2) // (10 * 500 * 4)  # 26 samples in half the budget
    assert jac.sample_block(p, budget=1 << 40) == min(300, jac.BLOCK_BYTES // (10 * 500 * 4)) // 2
    # one call then takes all 10 rows of 300 samples: its seeds and results (10 x 510 floats a
    # sample) fit CALL_BYTES for 205 samples, so two even blocks of 150
    assert jac.CALL_BYTES // (10 * 510 * 4) == 205 and jac.seed_block(p, 150, budget=1 << 40) >= 10
    assert jac.seed_block(p, 26, budget=1 * MiB) < jac.seed_block(p, 26, budget=64 * MiB)
    done = []
    J = jacli.api.compute(model, p, method="ad", max_memory=1 * MiB, progress=done.append)
    assert sum(done) == 300 and len(done) == -(-300 // 26)  # one progress call per sample block
    assert [s.index for s in J.summaries] == list(range(300))
    picks = [0, 25, 26, 299]  # both sides of a block boundary, and the last (short) block
    ref = mlp_jacobian(weights, x[picks])
    assert [J.summaries[i].frobenius for i in picks] == pytest.approx(np.linalg.norm(ref, axis=(1, 2)), rel=1e-4)
    np.testing.assert_allclose(jacli.jacobian(model, x, max_memory=1 * MiB)[picks], ref, atol=2e-5)


def _linear():
    """A linear model y = x W^T on numpy that records the rows of each VJP call."""
    from jacli.model import Model, TensorSpec

    class Linear(Model):
        def __init__(self, W):
            super().__init__(path="-", format="test", backend="numpy",
                             inputs=[TensorSpec("x", (None, W.shape[1]), "float32")],
                             outputs=[TensorSpec("y", (None, W.shape[0]), "float32")])
            self.W, self.sizes = W, []

        def _forward(self, xs):
            return {"y": xs["x"] @ self.W.T}

        def _vjp(self, xs, cts, wrt):
            self.sizes.append(len(xs["x"]))
            return {"x": cts["y"] @ self.W}

    return Linear


def test_a_call_that_takes_every_row_keeps_its_seeds_and_results_within_call_bytes(monkeypatch):
    """64 x 64 per sample (the Conv1d net's shape), one operator thread: one call takes all 64
    rows of 256 samples; their seeds and results (128 floats a row) would be 8 MiB, so two
    blocks of 128, and 200 samples in two blocks of 100 (even, not 128 + 72), whatever the
    number of threads."""
    monkeypatch.setenv("JACLI_THREADS", "1")
    Linear = _linear()
    W = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    model = Linear(W)
    for samples, block in ((256, 128), (200, 100), (100, 100)):
        x = np.ones((samples, 64), np.float32)
        p = jac.plan(model, {"x": x}, mode="reverse")
        assert jac.sample_block(p, budget=1 << 40) == block
        assert block * 64 * 128 * 4 <= jac.CALL_BYTES and jac.seed_block(p, block, budget=1 << 40) >= 64
        model.sizes.clear()
        np.testing.assert_array_equal(jacli.jacobian(model, x, mode="reverse", max_memory=1 << 40),
                                      np.broadcast_to(W, (samples, 64, 64)))
        assert model.sizes == [64 * block] * (samples // block)  # one folded call per block: all 64 rows
    monkeypatch.setenv("JACLI_THREADS", "2")
    assert jac.sample_block(jac.plan(model, {"x": np.ones((256, 64), np.float32)}, mode="reverse"), 1 << 40) == 128
    # an image-net shape, 2 rows of 12,288 columns: 85 samples' Jacobians fill BLOCK_BYTES, and
    # their one call (170 rows, fewer than CALL_ROWS) is not split although it passes CALL_BYTES
    p = jac.plan(Linear(np.ones((2, 12288), np.float32)), {"x": np.ones((100, 12288), np.float32)}, mode="reverse")
    assert jac.sample_block(p, budget=1 << 40) == jac.BLOCK_BYTES // (2 * 12288 * 4) == 85
    assert 85 * 2 * 12290 * 4 > jac.CALL_BYTES and 85 * 2 < jac.CALL_ROWS


def test_a_backend_sets_its_own_sample_blocks():
    """Model.block_bytes: TensorFlow's models run twice the engine's sample blocks (its allocator
    does not page-fault, its pfor maps gain from batches); the block and one call's seeds
    and results follow it, the Jacobian does not change."""
    from jacli.backends.tf import TFModel
    from jacli.model import Model

    class Wide(_linear()):  # an image-net shape: 2 rows of 12,288 columns
        block_bytes = TFModel.block_bytes

    assert TFModel.block_bytes == 2 * jac.BLOCK_BYTES and Model.block_bytes is None
    W = np.random.default_rng(2).standard_normal((2, 12288)).astype(np.float32)
    model, x = Wide(W), np.ones((400, 12288), np.float32)
    p = jac.plan(model, {"x": x}, mode="reverse")
    assert p.block_bytes == TFModel.block_bytes
    step = jac.sample_block(p, budget=1 << 40)
    assert step == TFModel.block_bytes // (2 * 12288 * 4) == 170  # against 85 in BLOCK_BYTES
    assert jac.seed_block(p, step, budget=1 << 40) >= 2  # both rows in one call
    assert jac.sample_block(p, budget=16 * MiB) == (8 * MiB) // (2 * 12288 * 4)  # still within half the budget
    np.testing.assert_array_equal(jacli.jacobian(model, x, mode="reverse", max_memory=1 << 40),
                                  np.broadcast_to(W, (400, 2, 12288)))
    assert model.sizes == [2 * 170, 2 * 170, 2 * 60]


def test_forward_mode_seeds_stay_within_a_block_on_wide_inputs(weights):
    """--mode forward on 500 inputs and 10 outputs: the tangents (k x samples x 500) are
    what grows with k, and they stay within BLOCK_BYTES, whatever the budget (a forced
    forward mode on a 10-class MobileNetV3 once took 2,730 columns per call, 7.3 GB)."""
    model = jacli.load(str(SAMPLES / "mlp.onnx"))
    x = np.random.default_rng(0).standard_normal((2000, 500)).astype(np.float32)
    p = jacli.api.plan(model, x, mode="forward")
    samples = jac.sample_block(p, budget=1 << 40)
    k = jac.seed_block(p, samples, budget=1 << 40)
    assert k * samples * 500 * 4 <= jac.BLOCK_BYTES < 2 * k * samples * 500 * 4
    np.testing.assert_allclose(jacli.jacobian(model, x[:50], mode="forward"), mlp_jacobian(weights, x[:50]), atol=2e-5)


def test_default_budget_comes_from_available_memory():
    free = jac.available_memory()
    assert free is not None and free > 0  # Linux: /proc/meminfo
    assert jac.default_budget() == max(64 * MiB, min(2 << 30, free // 4))


# --- refusing what cannot fit ---------------------------------------------------------
@pytest.fixture(scope="session")
def huge_model(tmp_path_factory):
    """y = tanh(x) with 2^21 inputs per sample: a 16 TiB Jacobian per sample from an 8 MiB input."""
    import onnx
    from onnx import TensorProto, helper

    d = tmp_path_factory.mktemp("huge")
    n = 1 << 21
    graph = helper.make_graph(
        [helper.make_node("Tanh", ["x"], ["y"])], "huge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, d / "huge.onnx")
    np.save(d / "x.npy", np.zeros((1, n), np.float32))
    return d


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "jacli", *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.parametrize("where, message", [
    ("file", "needs 16.0 TiB on disk"),
    ("-", "the Jacobian takes 16.0 TiB but only"),
])
def test_refuses_what_cannot_fit_before_starting(huge_model, where, message):
    d = huge_model
    out = ["-o", str(d / "J.h5")] if where == "file" else ["-o", "-"]
    code, stdout, stderr = _cli("compute", d / "huge.onnx", d / "x.npy", *out)
    assert code == 2 and stdout == ""
    assert stderr.startswith("Error: ") and stderr.count("\n") == 1 and message in stderr, stderr
    assert sorted(p.name for p in d.iterdir()) == ["huge.onnx", "x.npy"]  # no output, no temporary file


def test_api_refuses_an_in_memory_result_that_cannot_fit(huge_model):
    model = jacli.load(str(huge_model / "huge.onnx"))
    with pytest.raises(OutputError, match="of memory is available; compute it into a file"):
        jacli.jacobian(model, np.zeros((1, 1 << 21), np.float32))


# --- samples larger than the budget: streamed in row/column parts ---------------------
@pytest.fixture(scope="session")
def shaped_model(tmp_path_factory):
    """Inputs x (2, 3, 7) and u (4,), outputs y = tanh(W·flat(x) + V·u) shaped (3, 4, 5) and
    z = Σ x² (a scalar): multi-axis and scalar layouts, so that parts of a flattened row or
    column range are not whole slices of the output's axes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    W = (rng.standard_normal((42, 60)) / 6).astype(np.float32)
    V = (rng.standard_normal((4, 60)) / 2).astype(np.float32)
    init = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(V, "V"),
            numpy_helper.from_array(np.array([-1, 42]), "flat"), numpy_helper.from_array(np.array([-1, 3, 4, 5]), "cube"),
            numpy_helper.from_array(np.array([1]), "axis")]
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["xf"]),
        helper.make_node("MatMul", ["xf", "W"], ["a"]),
        helper.make_node("MatMul", ["u", "V"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["c"]),
        helper.make_node("Tanh", ["c"], ["t"]),
        helper.make_node("Reshape", ["t", "cube"], ["y"]),
        helper.make_node("Mul", ["xf", "xf"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "axis"], ["z"], keepdims=0),
    ]
    F = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "shaped",
        [helper.make_tensor_value_info("x", F, ["batch", 2, 3, 7]), helper.make_tensor_value_info("u", F, ["batch", 4])],
        [helper.make_tensor_value_info("y", F, ["batch", 3, 4, 5]), helper.make_tensor_value_info("z", F, ["batch"])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    d = tmp_path_factory.mktemp("shaped")
    onnx.save(model, d / "shaped.onnx")
    xs = {"x": rng.standard_normal((3, 2, 3, 7)).astype(np.float32), "u": rng.standard_normal((3, 4)).astype(np.float32)}
    np.savez(d / "in.npz", **xs)
    return d, xs


def _read(path, keys):
    if path.suffix == ".h5":
        import h5py

        with h5py.File(path) as f:
            return {k: f[k][()] for k in keys}
    if path.suffix == ".npy":
        return {keys[0]: np.load(path)}
    with np.load(path) as z:
        return {k: z[k] for k in keys}


@pytest.mark.parametrize("ext", ["h5", "npz", "npy"])
@pytest.mark.parametrize("mode, method", [("reverse", "ad"), ("forward", "ad"), ("auto", "fd")])
@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("budget", [4 << 10, 16 << 10])
def test_a_sample_larger_than_the_budget_streams_in_parts(shaped_model, tmp_path, ext, mode, method, batch, budget):
    """A 4 or 16 KiB budget for a 11 KiB per-sample Jacobian, 7 rows/columns per call: each
    part goes straight to the file (with 16 KiB, column blocks are first joined in pairs and
    triples), and the file is the in-memory Jacobian entry for entry."""
    d, xs = shaped_model
    model = jacli.load(str(d / "shaped.onnx"))
    of = ["y"] if ext == "npy" else None  # .npy holds one array
    wrt = ["x"] if ext == "npy" else None
    p = jacli.api.plan(model, xs, wrt=wrt, of=of, mode=mode, batch=batch)
    assert p.sample_bytes > budget // 2
    want = jacli.jacobian(model, xs, wrt=wrt, of=of, mode=mode, method=method, batch=batch, chunk_size=7)
    want = want if isinstance(want, dict) else {p.pairs[0].key: want}
    out = tmp_path / f"J.{ext}"
    result = jacli.api.compute(model, p, str(out), method=method, chunk_size=7, max_memory=budget)
    got = _read(out, list(want))
    assert set(got) == {q.key for q in p.pairs} and len(got) == (1 if ext == "npy" else 4)
    for key in want:
        assert got[key].shape == want[key].shape
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=key)
    full = jacli.api.compute(model, p, None, method=method, chunk_size=7)  # summaries from whole samples
    assert [(s.index, s.of, s.wrt) for s in result.summaries] == [(s.index, s.of, s.wrt) for s in full.summaries]
    for a, b in zip(result.summaries, full.summaries):
        assert (a.argmax, a.shape, a.nonfinite) == (b.argmax, b.shape, b.nonfinite)
        assert a.frobenius == pytest.approx(b.frobenius, rel=1e-6) and a.max_abs == pytest.approx(b.max_abs, rel=1e-6)
        assert a.zero_fraction == pytest.approx(b.zero_fraction)


def test_parts_summary_and_heatmap_match_whole_samples():
    """The terminal summary of the MLP (20 KiB per sample) with an 8 KiB budget: the same
    numbers, argmax and |J| heatmap as from whole samples, NaN samples included."""
    model = jacli.load(str(SAMPLES / "mlp.onnx"))
    x = np.load(SAMPLES / "mlp_input.npy")[:3].copy()
    x[1, 17] = np.nan
    p = jacli.api.plan(model, x)
    parts = jacli.api.compute(model, p, None, chunk_size=3, max_memory=8 << 10).summaries
    whole = jacli.api.compute(model, p, None, chunk_size=3).summaries
    assert len(parts) == len(whole) == 3 and parts[1].nonfinite == whole[1].nonfinite == 10 * 500
    for a, b in zip(parts, whole):
        a, b = a.to_json(), b.to_json()
        for k in ("frobenius", "max_abs", "zero_fraction"):
            assert a.pop(k) == pytest.approx(b.pop(k), rel=1e-6)
        assert a == b
    assert parts[0].heatmap is not None and parts[0].heatmap.shape == whole[0].heatmap.shape == (10, 40)
    np.testing.assert_allclose(parts[0].heatmap, whole[0].heatmap, rtol=1e-6)
    # the CLI's budget has a floor: a few KiB would mean one Jacobian row per backend call
    code, _, stderr = _cli("compute", SAMPLES / "mlp.onnx", SAMPLES / "mlp_input.npy", "-q", "--max-memory", "8K")
    assert code == 2 and stderr.startswith("Error:") and "1 MiB" in stderr and stderr.count("\n") == 1


def test_slabs_cover_every_flat_range_exactly_once():
    from jacli.io.writers import _slab_shape, slabs

    for shape in [(), (7,), (3, 4), (2, 3, 4), (3, 1, 2, 5)]:
        size = int(np.prod(shape))
        for start in range(size + 1):
            for stop in range(start, size + 1):
                seen = np.zeros(shape, int)
                flat = np.arange(size).reshape(shape)
                for index, lo, hi in slabs(shape, start, stop):
                    seen[index] += 1
                    assert flat[index].shape == _slab_shape(index, shape)
                    np.testing.assert_array_equal(np.ravel(flat[index]), np.arange(lo, hi))
                assert (seen.ravel() == ((np.arange(size) >= start) & (np.arange(size) < stop))).all()


def test_h5_chunks_for_parts_are_covered_whole_by_the_parts():
    from jacli.io.writers import _piece_chunks

    # rows: a C-order trailing block (contiguous in the flattened sample), 256 KiB
    assert _piece_chunks((2, 1000, 3, 224, 224), 4, True, 1, "rows") == (1, 1, 1, 224, 224)
    assert _piece_chunks((1000, 3, 224, 224), 4, False, 1, "rows") == (1, 1, 224, 224)
    # columns: every row of a trailing block of the inputs; with too many rows, a block of rows and one column
    assert _piece_chunks((2, 4096, 8192), 4, True, 1, "columns") == (1, 4096, 16)
    assert _piece_chunks((2, 3, 4, 5, 2, 3, 7), 4, True, 3, "columns") == (1, 3, 4, 5, 2, 3, 7)
    assert _piece_chunks((1, 100_000, 5), 4, True, 1, "columns") == (1, 65536, 1)
    assert _piece_chunks((1, 10, 20), 4, True, 2, "columns") == (1, 10, 20)  # scalar input


def test_a_sink_that_cannot_take_parts_still_refuses_a_sample_over_the_budget():
    class Whole:
        def write(self, key, s0, s1, block):
            raise AssertionError("nothing should be computed")

    model = jacli.load(str(SAMPLES / "mlp.onnx"))
    p = jacli.api.plan(model, np.zeros((2, 500), np.float32))
    with pytest.raises(InputError, match="one sample's Jacobian takes 19.5 KiB, more than the memory budget .8.0 KiB.; raise --max-memory"):
        jac.run(model, p, Whole(), budget=8 << 10)
    # an in-memory result is filled in place: the budget bounds only the working memory
    assert jacli.jacobian(model, np.zeros((2, 500), np.float32), max_memory=8 << 10).shape == (2, 10, 500)


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory):
    """y = tanh(x[:4096] * x[4096:]): one sample's Jacobian is 4096 x 8192 float32, 128 MiB."""
    import onnx
    from onnx import TensorProto, helper

    d = tmp_path_factory.mktemp("wide")
    graph = helper.make_graph(
        [helper.make_node("Split", ["x"], ["a", "b"], axis=1), helper.make_node("Mul", ["a", "b"], ["c"]),
         helper.make_node("Tanh", ["c"], ["y"])], "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8192])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4096])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, d / "wide.onnx")
    x = np.random.default_rng(0).standard_normal((2, 8192)).astype(np.float32)
    np.save(d / "x.npy", x)
    return d, x


@pytest.mark.parametrize("ext", ["h5", "npy"])
def test_samples_far_over_the_budget_stream_in_bounded_memory(wide_model, ext):
    """Two samples of 128 MiB each with a 16 MiB budget: peak RSS grows by less than one
    sample's Jacobian over the same command on one sample, and the file is exact (a diagonal
    pair of blocks: dy_i/dx_i = b_i·sech², dy_i/dx_{4096+i} = a_i·sech²)."""
    d, x = wide_model
    out = d / f"J.{ext}"
    rss, err = peak_rss("compute", str(d / "wide.onnx"), str(d / "x.npy"), "-o", str(out), "-q", "--max-memory", "16M")
    assert err == ""
    small, _ = peak_rss("compute", str(SAMPLES / "mlp.onnx"), str(SAMPLES / "mlp_input.npy"), "-o", str(d / "s.npy"), "-q")
    assert rss - small < 64 * MiB, ((rss - small) / MiB)
    a, b = x[:, :4096].astype(np.float64), x[:, 4096:].astype(np.float64)
    sech2 = 1 - np.tanh(a * b) ** 2  # float32 1 - tanh² is off by up to ~1e-7 absolute
    if ext == "h5":
        import h5py

        with h5py.File(out) as f:
            J = f["dy/dx"][()]
            assert f["dy/dx"].chunks == (1, 8, 8192)  # 256 KiB of whole rows: row parts cover whole chunks
    else:
        J = np.load(out)
    assert J.shape == (2, 4096, 8192)
    i = np.arange(4096)
    np.testing.assert_allclose(J[:, i, i], b * sech2, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(J[:, i, 4096 + i], a * sech2, rtol=1e-5, atol=2e-6)
    J[:, i, i] = 0
    J[:, i, 4096 + i] = 0
    assert not J.any()


# --- progress --------------------------------------------------------------------------
class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_shows_samples_rate_and_eta_on_a_terminal(monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setenv("COLUMNS", "120")
    with Progress(10, delay=0) as progress:
        progress(3)
        progress(4)
        shown = term.getvalue()
    assert "7/10" in shown and "70%" in shown and "samples/s" in shown and "ETA" in shown


def test_progress_advances_part_by_part_within_a_sample(shaped_model, tmp_path):
    d, xs = shaped_model
    model = jacli.load(str(d / "shaped.onnx"))
    p = jacli.api.plan(model, xs)
    calls = []
    jacli.api.compute(model, p, str(tmp_path / "J.h5"), chunk_size=7, max_memory=4 << 10, progress=calls.append)
    assert len(calls) > 3 * p.samples and all(0 <= c < 1 for c in calls)
    assert sum(calls) == pytest.approx(p.samples)
    done = np.cumsum(calls)
    assert np.all(np.diff(done) >= 0) and done[-1] == pytest.approx(3)


@pytest.mark.parametrize("terminal, enabled", [(False, True), (True, False)])
def test_progress_is_silent_off_a_terminal_and_when_quiet(monkeypatch, terminal, enabled):
    err = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with Progress(10, enabled=enabled, delay=0) as progress:
        for _ in range(10):
            progress(1)
    assert progress.done == 10 and progress.bar is None and err.getvalue() == ""


def test_progress_waits_for_the_delay(monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    with Progress(10, delay=60) as progress:
        progress(5)
    assert progress.bar is None and term.getvalue() == ""


def test_cli_json_run_prints_only_json(big_input):
    d, _ = big_input
    code, stdout, stderr = _cli("compute", SAMPLES / "mlp.onnx", d / "small.npy", "--json", "--max-memory", "1M")
    assert code == 0 and stderr == ""
    doc = json.loads(stdout)
    assert [s["index"] for s in doc["samples"]] == list(range(100))


# --- fast repeated calls ---------------------------------------------------------------
class Counting(jacli.model.Model):
    """y = 2x on (B, 3) -> (B, 3), with a signature that may lie; counts forward passes."""

    def __init__(self, out_shape):
        super().__init__(path="-", format="test", backend="numpy",
                         inputs=[jacli.model.TensorSpec("x", (None, 3), "float32")],
                         outputs=[jacli.model.TensorSpec("y", out_shape, "float32")])
        self.forwards = 0

    def _forward(self, xs):
        self.forwards += 1
        return {"y": 2 * xs["x"]}

    def _vjp(self, xs, cts, wrt):
        return {"x": 2 * cts["y"]}


@pytest.mark.parametrize("out_shape, trusted", [((None, 3), True), ((None, 4), False), ((5, 3), False)])
def test_plan_skips_the_forward_pass_once_the_signature_is_confirmed(out_shape, trusted):
    model, x = Counting(out_shape), np.ones((5, 3), np.float32)
    first = jac.plan(model, {"x": x})
    assert model.forwards == 1 and model.signature_confirmed is trusted
    second = jac.plan(model, {"x": x})
    assert model.forwards == (1 if trusted else 2)
    assert [p.shape for p in second.pairs] == [p.shape for p in first.pairs] == [(5, 3, 3)]
    np.testing.assert_array_equal(second.ys["y"], 2 * x)  # computed on demand
    np.testing.assert_array_equal(jacli.jacobian(model, x), np.broadcast_to(2 * np.eye(3), (5, 3, 3)))


def test_tensorflow_traces_each_graph_once_whatever_the_block_sizes(weights):
    model = jacli.load(str(SAMPLES / "mlp.keras"))
    x = np.random.default_rng(5).standard_normal((700, 500)).astype(np.float32)
    # 1 MiB: blocks of 26 samples, one row per call; default budget: blocks of 419 and 281
    # samples, all 10 rows per call; then other batch sizes
    for batch, budget in ((700, 1 * MiB), (700, None), (333, None), (5, None)):
        J = jacli.jacobian(model, x[:batch], max_memory=budget)
        np.testing.assert_allclose(J[[0, batch - 1]], mlp_jacobian(weights, x[[0, batch - 1]]), atol=2e-5)
    # forward (the first plan only), one-row VJP, and for 10 rows the vectorised and the
    # unrolled sequential VJP (both tried by the strategy tuner); the while-loop variant is
    # for more rows than UNROLL
    fns = (model._call_fn, model._vjp_fn, model._vjp_map_fn, model._vjp_unrolled_fn, model._vjp_seq_fn)
    assert [f.experimental_get_tracing_count() for f in fns] == [1, 1, 1, 1, 0]
