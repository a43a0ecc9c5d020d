"""The engine on a pure-numpy model: block loops, folding, chunking for fixed batch
sizes, sample blocks under a tiny memory budget, and the summary statistics."""
from __future__ import annotations

import numpy as np
import pytest

from jacli.engine import jacobian as jac
from jacli.engine.stats import StatsSink, summarize
from jacli.errors import InputError
from jacli.model import Model, TensorSpec

RNG = np.random.default_rng(0)
A = RNG.standard_normal((4, 3))
B = RNG.standard_normal((4, 3))


class NumpyModel(Model):
    """y = tanh(x A) * (x B), per sample, with hand-written VJP/JVP; counts calls and
    records the batch sizes it is called with."""

    def __init__(self, fixed=None, mix=False):
        super().__init__(path="numpy", format="numpy", backend="numpy",
                         inputs=[TensorSpec("x", (fixed, 4), "float64")], outputs=[TensorSpec("y", (fixed, 3), "float64")])
        self.mix, self.batches = mix, []

    def _f(self, x):
        if self.mix:  # every sample sees the batch mean: not per-sample
            x = x + x.mean(0, keepdims=True)
        return np.tanh(x @ A), x @ B

    def _forward(self, xs):
        self.batches.append(len(xs["x"]))
        t, u = self._f(xs["x"])
        return {"y": t * u}

    def _vjp(self, xs, cts, wrt):
        self.batches.append(len(xs["x"]))
        t, u = self._f(xs["x"])
        c = cts["y"]
        g = (c * u * (1 - t**2)) @ A.T + (c * t) @ B.T
        return {"x": g + g.mean(0, keepdims=True) if self.mix else g}

    def _jvp(self, xs, ts, of):
        self.batches.append(len(xs["x"]))
        t, u = self._f(xs["x"])
        v = ts["x"] + ts["x"].mean(0, keepdims=True) if self.mix else ts["x"]
        return {"y": (1 - t**2) * (v @ A) * u + t * (v @ B)}


def reference(x):
    t, u = np.tanh(x @ A), x @ B
    # d(t*u)_i/dx_j = (1 - t_i^2) A_ji u_i + t_i B_ji
    return (1 - t**2)[:, :, None] * A.T[None] * u[:, :, None] + t[:, :, None] * B.T[None]


X = RNG.standard_normal((5, 4))


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_modes_and_blocks(mode, chunk):
    m = NumpyModel()
    p = jac.plan(m, {"x": X}, mode=mode)
    sink = jac.ArraySink(p)
    jac.run(m, p, sink, chunk=chunk)
    np.testing.assert_allclose(sink.arrays["dy/dx"], reference(X), atol=1e-12)


def test_auto_mode_picks_the_smaller_side():
    assert jac.plan(NumpyModel(), {"x": X}).mode == "reverse"  # 3 outputs < 4 inputs


def test_fd_matches_closed_form():
    m = NumpyModel()
    p = jac.plan(m, {"x": X})
    sink = jac.ArraySink(p)
    jac.run(m, p, sink, method="fd")
    np.testing.assert_allclose(sink.arrays["dy/dx"], reference(X), atol=1e-8)


@pytest.mark.parametrize("fixed", [1, 3])
def test_fixed_batch_models_are_chunked_and_padded(fixed):
    m = NumpyModel(fixed=fixed)
    p = jac.plan(m, {"x": X}, mode="reverse")
    sink = jac.ArraySink(p)
    jac.run(m, p, sink)
    np.testing.assert_allclose(sink.arrays["dy/dx"], reference(X), atol=1e-12)
    assert set(m.batches) == {fixed}


def test_tiny_budget_streams_sample_blocks():
    m = NumpyModel()
    p = jac.plan(m, {"x": X})
    assert jac.sample_block(p, budget=2 * 3 * 4 * 8 * 2) == 2

    class Recorder:
        def __init__(self):
            self.calls = []

        def write(self, key, s0, s1, block):
            self.calls.append((s0, s1, block.copy()))

    rec = Recorder()
    jac.run(m, p, rec, budget=2 * 3 * 4 * 8 * 2)
    assert [(a, b) for a, b, _ in rec.calls] == [(0, 2), (2, 4), (4, 5)]
    np.testing.assert_allclose(np.concatenate([c for _, _, c in rec.calls]), reference(X), atol=1e-12)


def test_no_batch_sees_cross_sample_terms():
    m = NumpyModel(mix=True)
    p = jac.plan(m, {"x": X}, batch=False, mode="reverse")
    sink = jac.ArraySink(p)
    jac.run(m, p, sink)
    J = sink.arrays["dy/dx"]
    assert J.shape == (5, 3, 5, 4)
    p_fd = jac.plan(m, {"x": X}, batch=False)
    fd = jac.ArraySink(p_fd)
    jac.run(m, p_fd, fd, method="fd")
    np.testing.assert_allclose(J, fd.arrays["dy/dx"], atol=1e-8)
    assert np.abs(J[0, :, 1]).max() > 1e-3  # sample 0's output depends on sample 1's input


def test_unknown_names_and_bad_mode():
    m = NumpyModel()
    with pytest.raises(InputError, match="--wrt 'z'"):
        jac.plan(m, {"x": X}, wrt=["z"])
    with pytest.raises(InputError, match="--mode"):
        jac.plan(m, {"x": X}, mode="diagonal")


def test_summary_statistics():
    J = np.array([[0.0, -3.0, 1.0], [2.0, 0.0, 0.0]])
    s = summarize(J, 7, "y", "x", out_ndim=1)
    assert s.frobenius == pytest.approx(np.sqrt(14))
    assert s.max_abs == 3 and s.argmax == ([0], [1])
    assert s.zero_fraction == pytest.approx(0.5)
    np.testing.assert_array_equal(s.heatmap, np.abs(J))
    big = summarize(np.arange(100.0 * 100).reshape(100, 100), 0, "y", "x", 1)
    assert big.heatmap.shape == (12, 40) and big.heatmap.max() == 9999
    s3 = summarize(np.zeros((2, 3, 4)), 0, "y", "x", out_ndim=2)
    assert s3.heatmap is None and s3.zero_fraction == 1.0 and len(s3.argmax[0]) == 2


def test_stats_sink_passes_blocks_through():
    m = NumpyModel()
    p = jac.plan(m, {"x": X})
    inner = jac.ArraySink(p)
    stats = StatsSink(p.pairs, inner=inner)
    jac.run(m, p, stats)
    assert [s.index for s in stats.ordered()] == list(range(5))
    np.testing.assert_allclose(inner.arrays["dy/dx"], reference(X), atol=1e-12)
    assert stats.ordered()[2].frobenius == pytest.approx(np.linalg.norm(reference(X)[2]))
