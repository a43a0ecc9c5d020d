"""TensorFlow's map strategies (jacli/backends/tf.py) on a small MobileNet-style Keras net, as
.keras and as a Keras 3 export: every strategy and JVP route gives the float64 Jacobian, a
Keras model's layers and a SavedModel's signature (inlined) are traced into jacli's graphs
(no function-call op for TensorFlow to differentiate through), repeated calls do not trace
again, and forced forward mode stays within its memory budget in both formats."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jacli
from jacli.backends.tf import _operations
from jacli.engine import strategies

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5  # strategies differ only in float rounding (as in test_strategies.py)


@pytest.fixture(scope="module")
def convnet(tmp_path_factory):
    """(paths by format, inputs for 3 samples, float64 reference of dy/da)."""
    import corpus_keras as ck

    model = ck.BUILDERS["convnet"]()
    xs = ck.inputs(model, 3)
    directory = tmp_path_factory.mktemp("convnet")
    paths = {fmt: ck.save("convnet", model, fmt, directory) for fmt in ("keras", "export")}
    return paths, xs["a"], ck.reference("convnet", model, xs)[0, 0]


def _tf_functions(model):
    return [model._call_fn, model._vjp_fn, model._vjp_map_fn, model._vjp_seq_fn, model._vjp_unrolled_fn,
            *model._jvp_fns.values()]


@pytest.mark.parametrize("fmt", ["keras", "export"])
def test_every_strategy_and_jvp_route_gives_the_float64_jacobian(convnet, fmt, monkeypatch):
    paths, x, want = convnet
    model = jacli.load(str(paths[fmt]))
    scale = np.abs(want).max()
    got = {}
    # reverse: 20 rows; in one block of 20 (the sequential map is a while loop), or of 8 (unrolled)
    for strategy in ("vectorised", "sequential"):
        monkeypatch.setenv(strategies.PIN, strategy)
        for chunk in (None, 8):
            got[f"vjp {strategy} {chunk}"] = jacli.jacobian(model, x, chunk_size=chunk)
    monkeypatch.delenv(strategies.PIN)
    assert all(f.experimental_get_tracing_count() for f in (model._vjp_seq_fn, model._vjp_unrolled_fn))
    # forward: 432 columns; by two reverse passes (the first route) or forward-mode AD, mapped or not
    for route in (True, False):
        for chunk in (None, 1):
            model._tangent_route = route
            got[f"jvp by_vjp={route} {chunk}"] = jacli.jacobian(model, x, mode="forward", chunk_size=chunk)
            assert model._tangent_route is route
    assert set(model._jvp_fns) == {(True, True), (True, False), (False, True), (False, False)}
    first = got["vjp vectorised None"]
    for label, J in got.items():
        np.testing.assert_allclose(J, want, atol=2e-5 * scale, err_msg=label)
        np.testing.assert_allclose(J, first, atol=RTOL * scale, err_msg=label)


@pytest.mark.parametrize("fmt, called", [("keras", False), ("export", False), ("export", True)])
def test_jvps_go_by_two_reverse_passes_unless_the_model_calls_functions(convnet, fmt, called, monkeypatch):
    """Keras' layers and a SavedModel's signature inlined (tf_inline.py): two reverse passes;
    a signature called as a function (where inlining fails: two nested tapes would
    differentiate it through higher-order functions): forward mode."""
    from tensorflow.python.framework import convert_to_constants

    paths, x, want = convnet
    if called:
        monkeypatch.setattr(convert_to_constants, "_run_inline_graph_optimization", _grappler_fails)
    model = jacli.load(str(paths[fmt]))
    J = jacli.jacobian(model, x, mode="forward")
    assert model._tangent_route is not called
    assert model._calls_functions() is called
    np.testing.assert_allclose(J, want, atol=2e-5 * np.abs(want).max())


def _grappler_fails(*args, **kwargs):
    raise RuntimeError("grappler failed")


@pytest.mark.parametrize("fmt", ["keras", "export"])
def test_the_model_is_traced_into_the_graph_and_nothing_is_traced_twice(convnet, fmt, monkeypatch):
    """Keras' layers, and a SavedModel's signature inlined: no call of a function in jacli's graphs."""
    paths, x, _ = convnet
    model = jacli.load(str(paths[fmt]))
    monkeypatch.setenv(strategies.PIN, "vectorised")
    for mode in ("reverse", "forward"):
        jacli.jacobian(model, x[:2], mode=mode)
    calls = {op.type for key, g in model._graphs.items() for op in _operations(g.graph)} & {
        "PartitionedCall", "StatefulPartitionedCall"}
    assert not calls  # the model's ops sit in jacli's graphs, not behind a call of a tf.function
    traces = [f.experimental_get_tracing_count() for f in _tf_functions(model)]
    graphs = len(model._graphs)
    for batch, chunk in ((2, None), (3, None), (1, None), (3, 7), (2, 7)):  # other batches and k: open axes
        for mode in ("reverse", "forward"):
            jacli.jacobian(model, x[:batch], mode=mode, chunk_size=chunk)
    assert [f.experimental_get_tracing_count() for f in _tf_functions(model)] == traces
    assert len(model._graphs) == graphs


_PEAK = ("import resource, subprocess, sys\n"
         "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
         "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
         "sys.stderr.write(r.stderr[-2000:])\n")


def _peak_mib(*args) -> float:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TF_CPP_MIN_LOG_LEVEL": "3", "JACLI_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "jacli", *map(str, args)],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    code, kib = r.stdout.split()
    assert code == "0", r.stderr
    return int(kib) / 1024


@pytest.mark.parametrize("fmt", ["keras", "export"])
def test_forced_forward_mode_stays_within_the_budget_over_the_model(convnet, tmp_path, fmt):
    """Peak RSS of ``compute --mode forward --max-memory 40M`` within 40 MiB of ``inspect``'s
    (the model itself; 30 MiB above it here, either format): by forward-mode AD through
    Keras' layers, as before, the vectorised map's graph alone took 53 MiB; through a
    SavedModel's signature called as a function, 68 MiB."""
    paths, x, _ = convnet
    np.save(tmp_path / "x.npy", x)
    base = _peak_mib("inspect", paths[fmt])
    peak = _peak_mib("compute", paths[fmt], tmp_path / "x.npy", "-o", tmp_path / "J.h5", "-q",
                     "--mode", "forward", "--max-memory", "40M")
    assert peak - base <= 40, (peak, base)
