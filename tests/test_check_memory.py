"""`check --directions K` within `--max-memory` over the model itself (issue 12), on Keras:
the check's peak resident memory, above what the loaded model holds, stays within the
budget (a Keras application in a subprocess); what the set-up leaves resident (the float64
copy, traced graphs) comes off the budget (``fd.left``), memory the allocator holds free is
handed back before anything is measured (``fd.release``), and a check's few groups of
directions fold their seeds into the batch on TensorFlow (one plain graph) instead of
tracing a vectorised map and a tuner's trial for each primitive."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jacli
from jacli.engine import fd, strategies

ROOT = Path(__file__).resolve().parents[1]

# load the model, note its resident size, reset the peak, check: peak and resident size after load, MiB
_CHECK = """
import json, sys
import numpy as np
import jacli
from jacli.limits import parse_size

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))

path, x, directions, budget = sys.argv[1], np.load(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = jacli.load(path)
loaded = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak from here on (loading has a transient of its own)
result = jacli.check(model, x, directions=directions, max_memory=parse_size(budget))
print(json.dumps({"loaded": loaded, "peak": status("VmHWM"), "passed": result.passed}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc to measure the peak")
def test_directions_check_of_a_keras_application_stays_within_the_budget_over_the_model(tmp_path):
    """MobileNetV3Small (weights=None) at 96x96x3, ``--directions 4 --max-memory 224M``: the
    peak is at most 224 MiB above the loaded model's resident size (here ~170: the float64
    copy, the forward, JVP and VJP graphs, FD pieces). Before, 295 MiB: the vectorised (pfor)
    JVP and VJP graphs and the tuner's trial of a sequential VJP on top of the probe's plain
    JVP graph, FD pieces sized as if the set-up took nothing, and the float64 copy's weights
    held three times over while it was built."""
    import keras

    import corpus_keras as ck

    keras.utils.set_random_seed(0)
    cls, extra = ck.APPLICATIONS["mobilenet_v3_small"]
    model = getattr(keras.applications, cls)(input_shape=(96, 96, 3), weights=None, classes=10,
                                              classifier_activation=None, **extra)
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((1, 96, 96, 3)).astype(np.float32))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("JACLI_STRATEGY", None)
    r = subprocess.run([sys.executable, "-c", _CHECK, str(tmp_path / "m.keras"), str(tmp_path / "x.npy"), "4", "224M"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["passed"]
    assert out["peak"] - out["loaded"] <= 224, out


def test_the_set_up_comes_off_the_budget():
    """``fd.left``: the budget less the resident growth since ``start``, never below an eighth of it."""
    start = fd.resident()
    if start is None:
        pytest.skip("no resident size to read here")
    held = np.ones(64 << 17)  # 64 MiB, touched
    room = fd.left(256 << 20, start)
    assert (256 - 64 - 16) << 20 <= room <= (256 - 64 + 16) << 20, room >> 20
    assert fd.left(32 << 20, start) == 4 << 20  # the set-up took more than the budget: an eighth goes on
    del held


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc to measure the peak")
def test_forward_cost_sees_memory_the_allocator_kept():
    """A forward pass that allocates 80 MB in small blocks, after 160 MB of small blocks were
    freed (kept by the C allocator for reuse, as TensorFlow's freed buffers are): measured at
    its size, not at the 64-bytes-per-element floor (what it measured before ``release``)."""
    junk = [np.ones(1000) for _ in range(20_000)]  # 8 kB blocks: from the heap, not mmap
    pin = np.ones(1000)  # above them in the heap: their space is not given back when they are freed
    del junk

    def forward(xs):
        blocks = [np.ones(1000) for _ in range(10_000)]
        return {"y": xs["x"] + len(blocks)}

    cost = fd.forward_cost(forward, {"x": np.zeros((1, 4))})
    assert cost >= 60e6, cost
    del pin


@pytest.fixture(scope="module")
def convnet(tmp_path_factory):
    import corpus_keras as ck

    model = ck.BUILDERS["convnet"]()
    path = ck.save("convnet", model, "keras", tmp_path_factory.mktemp("convnet"))
    return path, ck.inputs(model, 2)["a"]


def test_a_checks_directions_fold_on_tensorflow_and_trace_no_map(convnet, monkeypatch):
    """``strategies.jvp/vjp(few=True)`` on a TensorFlow model fold the k seeds into the batch
    (the plain JVP/VJP graphs, the ones the probe traced; no pfor map, no tuner trial) and
    agree with the vectorised map; a check by directions traces no map graph and passes."""
    monkeypatch.delenv("JACLI_STRATEGY", raising=False)
    path, x = convnet
    model = jacli.load(path)
    maps = {model._vjp_map_fn, model._vjp_seq_fn, model._vjp_unrolled_fn,
            *(f for (_, mapped), f in model._jvp_fns.items() if mapped)}
    result = jacli.check(model, x, directions=5)
    assert result.passed and result.kind == "directions" and result.mode == "forward"
    assert not [key for key in model._graphs if key[0] in maps]
    rng = np.random.default_rng(1)
    xs = {"a": x}
    ts = {"a": rng.standard_normal((3, *x.shape)).astype(np.float32)}
    cts = {o: rng.standard_normal((3, *y.shape)).astype(np.float32) for o, y in model.forward(xs).items()}
    folded_j = strategies.jvp(model, xs, ts, model.output_names(), few=True)
    folded_v = strategies.vjp(model, xs, cts, ["a"], few=True)
    assert not [key for key in model._graphs if key[0] in maps]
    mapped_j = model.jvp(xs, ts, model.output_names(), strategy="vectorised")
    mapped_v = model.vjp(xs, cts, ["a"], strategy="vectorised")
    for a, b in ((folded_j, mapped_j), (folded_v, mapped_v)):
        for n in a:
            assert a[n].shape == b[n].shape
            np.testing.assert_allclose(a[n], b[n], rtol=1e-5, atol=1e-5 * np.abs(b[n]).max())
