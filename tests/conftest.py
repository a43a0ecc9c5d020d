"""Shared fixtures: the sample models, an in-process CLI runner, numpy references."""
from __future__ import annotations

import os

# Before numpy/torch/TF start their thread pools: `pytest -n 2` runs two workers on two
# cores, and small matrices on oversubscribed BLAS/OpenMP pools run 10-100x slower.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The ONNX loader's cache goes to one temporary folder per test session (shared by the
# workers, which inherit it), never to ~/.cache.
if "JACLI_CACHE_DIR" not in os.environ:
    import atexit, shutil, tempfile  # noqa: E401

    os.environ["JACLI_CACHE_DIR"] = tempfile.mkdtemp(prefix="jacli-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JACLI_CACHE_DIR"], ignore_errors=True)

import io  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
sys.path.insert(0, str(SAMPLES))
import generate  # noqa: E402  (the sample-model script: weights and numpy references)


@dataclass
class Result:
    code: int
    stdout: bytes
    stderr: str

    @property
    def out(self) -> str:
        return self.stdout.decode()


def run_jacli(*args: str, stdin: bytes = b"") -> Result:
    """Run the real CLI entry point (jacli.cli.main.main) in-process and capture everything."""
    from jacli.cli.main import main

    out, err = io.BytesIO(), io.StringIO()
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    wrapper = sys.stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    sys.stderr = err
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        wrapper.flush()
        wrapper.detach()  # keep ``out`` open when the wrapper is collected
        sys.stdin, sys.stdout, sys.stderr = saved
    return Result(code, out.getvalue(), err.getvalue())


# Runs the real entry point in a fresh interpreter, then records its exit code and which
# top-level packages ended up imported.
_PROBE = """
import json, sys
from jacli.cli.main import main
report, argv = sys.argv[1], sys.argv[2:]
try:
    main(argv)
except SystemExit as e:
    code = e.code
with open(report, "w") as f:
    json.dump({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}, f)
"""


def imported(tmp_path, *args, env=None) -> set[str]:
    """The top-level packages a cold ``jacli ARGS`` process imports (asserting it succeeds)."""
    report = tmp_path / "modules.json"
    r = subprocess.run([sys.executable, "-c", _PROBE, str(report), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    doc = json.loads(report.read_text())
    assert doc["code"] in (0, None), r.stderr
    return set(doc["modules"])


@pytest.fixture(scope="session")
def weights():
    return generate.weights()


@pytest.fixture(scope="session")
def jacli():
    return run_jacli


def mlp_jacobian(w, x):
    """Hand-vectorised float64 backward pass of the sample MLP: (B, 10, 500)."""
    x = x.astype(np.float64)
    h = np.tanh(x @ w["W1"] + w["b1"])
    s = generate.mlp_numpy(w, x)
    dsoft = s[:, :, None] * np.eye(10) - s[:, :, None] * s[:, None, :]  # diag(s) - s s^T
    return np.einsum("bij,kj,bk,lk->bil", dsoft, w["W2"], 1 - h**2, w["W1"])


def map2d_jacobian(x):
    """[[2x, -2y], [2y, 2x]] per sample."""
    x, y = x[:, 0].astype(np.float64), x[:, 1].astype(np.float64)
    return np.stack([np.stack([2 * x, -2 * y], -1), np.stack([2 * y, 2 * x], -1)], 1)


def fd_jacobian(f, x, h=1e-6):
    """Central differences in float64 of a per-sample numpy function: (B, *out, *in)."""
    x = x.astype(np.float64)
    cols = []
    for j in range(x[0].size):
        e = np.zeros(x[0].size)
        e[j] = h
        e = e.reshape(x.shape[1:])
        cols.append((f(x + e) - f(x - e)) / (2 * h))
    J = np.stack(cols, -1)
    return J.reshape(J.shape[:-1] + x.shape[1:])
