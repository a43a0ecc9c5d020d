"""ONNX derivative calls in lanes (jacli/backends/onnx/lanes.py): one call split into
concurrent parts on one-thread sessions, a strategy beside the whole call."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import jacli
from jacli.backends.onnx import lanes
from jacli.engine import strategies

STRATEGY_RTOL = 1e-5  # as tests/test_strategies.py: strategies differ only in float rounding


def test_a_call_splits_along_samples_else_along_seeds_and_its_parts_run_at_once():
    barrier = threading.Barrier(2, timeout=10)  # each part waits for the other: they must overlap
    calls = []

    def one(xs, seeds):
        calls.append((xs["x"].shape[0], seeds["s"].shape[:2]))
        barrier.wait()
        return {"g": seeds["s"] * xs["x"][None]}  # k x B x ..., as a VJP's result

    rng = np.random.default_rng(0)
    for b, k, want in ((5, 3, {(2, (3, 2)), (3, (3, 3))}), (1, 4, {(1, (2, 1))})):
        xs, seeds = {"x": rng.standard_normal((b, 2))}, {"s": rng.standard_normal((k, b, 2))}
        calls.clear()
        got = lanes.run(one, xs, seeds, 2)
        assert set(calls) == want and len(calls) == 2
        np.testing.assert_array_equal(got["g"], seeds["s"] * xs["x"][None])
    calls.clear()
    single = {"x": np.ones((1, 2))}, {"s": np.ones((1, 1, 2))}
    assert not lanes.splits(*single, 2) and not lanes.splits({"x": np.ones((4, 2))}, {"s": np.ones((2, 4, 2))}, 1)
    barrier = threading.Barrier(1)
    lanes.run(one, *single, 2)
    assert calls == [(1, (1, 1))]  # one sample, one seed: the whole call


def test_an_error_in_a_lane_is_the_calls_error():
    def one(xs, seeds):
        if xs["x"][0, 0] > 0:
            raise ValueError("the second half failed")
        return {"g": seeds["s"]}

    x = np.concatenate([-np.ones((2, 1)), np.ones((2, 1))])
    with pytest.raises(ValueError, match="second half"):
        lanes.run(one, {"x": x}, {"s": np.ones((1, 4, 1))}, 2)


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    """Real architectures of the corpus as ONNX, with their float64 torch references."""
    import corpus_torch

    out = {}
    for name in ("mobilenet_v3_small", "conv1d", "lstm"):
        module, x = corpus_torch.build(name, batch=3)
        paths, failed = corpus_torch.save_all(module, x, tmp_path_factory.mktemp(name), formats=("onnx",))
        assert "onnx" in paths, failed
        out[name] = (paths["onnx"], x.numpy(), corpus_torch.reference_jacobian(module, x))
    return out


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "conv1d", "lstm"])
def test_every_onnx_strategy_gives_the_same_jacobian_in_lanes_or_whole(onnx_models, name, monkeypatch):
    """With two threads each way of running the tiled graph, whole or in lanes, gives the
    float64 reference's Jacobian, in both modes, split along the 3 samples and (one sample)
    along the seeds; the lanes' sessions have one thread each. With one thread there are
    no lanes."""
    monkeypatch.setenv("JACLI_CACHE_DIR", "off")
    monkeypatch.setenv("JACLI_THREADS", "2")
    path, x, want = onnx_models[name]
    scale = np.abs(want).max()
    for mode, kind in (("reverse", "vjp"), ("forward", "jvp")):
        for xb, wb in ((x, want), (x[:1], want[:1])):
            model = jacli.load(str(path))
            plan = jacli.api.plan(model, xb, mode=mode)
            seeds = {n: np.zeros((2,) + v.shape, np.float32) for n, v in (plan.ys if kind == "vjp" else plan.xs).items()}
            offered = model.strategies(kind, plan.xs, seeds)
            assert offered == ("whole", "lanes")
            results = {}
            for s in offered:
                monkeypatch.setenv(strategies.PIN, s)
                results[s] = jacli.jacobian(model, xb, mode=mode)
            monkeypatch.delenv(strategies.PIN)
            for s, J in results.items():
                np.testing.assert_allclose(J, wb, atol=2e-5 * scale, err_msg=f"{mode} {s}")
                np.testing.assert_allclose(J, results["whole"], atol=STRATEGY_RTOL * scale, err_msg=f"{mode} {s}")
            threads = {key[-1]: sess.get_session_options().intra_op_num_threads
                       for key, sess in model._graphs.items() if key[0] == f"{kind}-tiled" and sess is not None}
            assert threads == {("y",): 2, "lanes": 1}
    monkeypatch.setenv("JACLI_THREADS", "1")
    model = jacli.load(str(path))
    assert model.strategies("vjp", {"x": x}, {"y": np.zeros((2, *want.shape[:-len(x.shape) + 1]), np.float32)}) == ()
