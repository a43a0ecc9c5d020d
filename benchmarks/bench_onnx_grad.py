"""Per-sample Jacobians: jacli's ONNX VJP graph in onnxruntime vs torch.func.

ONNX path: the model exported by ``torch.onnx.export`` goes through
``jacli.backends.onnx.derive.build_vjp``; the k = (outputs per sample) Jacobian rows are
folded into the batch axis (the input tiled k times, one-hot cotangents), so one
``session.run`` gives every sample's Jacobian; the timing includes the tiling, and the
result is a (B, m, n) view. Torch path: ``torch.func.vmap(torch.func.jacrev(f))`` on the
same weights. Both use ``--threads`` threads (default: all cores); the two results are
checked against each other, then timed (medians over repeats after a warm-up run).

Results on the development VM (2 cores shared with other jobs: load average 6-9 during
the runs, so absolute times are noisy and the 2-thread torch runs suffer most from
preemption; ratios at 1 thread are the more trustworthy), torch 2.13 CPU, onnxruntime
1.32. Commands ``.venv/bin/python benchmarks/bench_onnx_grad.py --threads 1`` and
``... --threads 2`` (the default: all cores):

    threads  model                     batch  onnx [ms]  torch [ms]  torch/onnx
    1        mlp 500-100-10 softmax        1       0.09        1.77        18.9
    1        mlp 500-100-10 softmax       64       2.61       11.04         4.2
    1        mlp 500-100-10 softmax    10000    1283.41     1535.67         1.2
    1        cnn 1x28x28 (2 conv)          1       0.88        7.62         8.7
    1        cnn 1x28x28 (2 conv)         64     245.15      287.74         1.2
    1        cnn 1x28x28 (2 conv)       1000    2547.42     3165.84         1.2
    2        mlp 500-100-10 softmax        1       0.07       54.91       739.4
    2        mlp 500-100-10 softmax       64      18.52      244.03        13.2
    2        mlp 500-100-10 softmax    10000    1350.15     1420.10         1.1
    2        cnn 1x28x28 (2 conv)          1       1.21      343.30       284.7
    2        cnn 1x28x28 (2 conv)         64     327.52      372.47         1.1
    2        cnn 1x28x28 (2 conv)       1000    5623.12     6687.62         1.2

The folded ONNX run recomputes the forward pass k times (the input is tiled), so at
batch 10,000 it does about twice torch's arithmetic (two 500x100 GEMMs on 100,000 rows
against one plus a forward on 10,000); it still keeps up because torch.func pays for
vmap-of-jacrev dispatch and fresh allocations. Tuning that mattered: no ``Where`` in the
activation/mask rules (onnxruntime's Where is ~8x slower than a Mul), MaxPool via its
Indices output (scatter/gather) instead of window masks, and persistent IOBinding
buffers (fresh 200 MB arrays per call cost more than the GEMMs on this VM).
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jacli.backends.onnx.derive import build_vjp  # noqa: E402


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(500, 100), nn.Tanh(), nn.Linear(100, 10), nn.Softmax(-1))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10), nn.Softmax(-1),
    )


def export(module: nn.Module, sample: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (sample,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


class OnnxJacobian:
    """Per-sample Jacobian (B, k, *in) from one run of the VJP graph on k*B folded rows.

    Tuning: the folded input, the one-hot cotangents and the output live in buffers kept
    between calls (bound with IOBinding), so the ~3 x 200 MB of a batch-10,000 MLP call is
    not freshly allocated (page-faulted) every time; the result is a (B, k, *in) view of
    the output buffer, valid until the next call."""

    def __init__(self, model: onnx.ModelProto, k: int, threads: int):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(build_vjp(model, ["x"], ["y"]).SerializeToString(), options,
                                            providers=["CPUExecutionProvider"])
        self.k = k
        self.binding = self.session.io_binding()
        self.buffers: dict[str, np.ndarray] = {}

    def _buffer(self, name: str, shape: tuple, fill=None) -> np.ndarray:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape != shape:
            buffer = self.buffers[name] = np.empty(shape, np.float32)
            if fill is not None:
                buffer[...] = fill()
        return buffer

    def __call__(self, x: np.ndarray) -> np.ndarray:
        b, k, sample = len(x), self.k, x.shape[1:]
        folded = self._buffer("x", (k * b,) + sample)
        folded.reshape((k, b) + sample)[...] = x  # block i = all samples, cotangent row i
        cts = self._buffer("ct", (k * b, k), fill=lambda: np.repeat(np.eye(k, dtype=np.float32), b, axis=0))
        grads = self._buffer("grad", folded.shape)
        self.binding.bind_cpu_input("x", folded)
        self.binding.bind_cpu_input("ct:y", cts)
        self.binding.bind_output("grad:x", "cpu", 0, np.float32, grads.shape, grads.ctypes.data)
        self.session.run_with_iobinding(self.binding)
        return grads.reshape((k, b) + sample).swapaxes(0, 1)


def torch_jacobian(module: nn.Module):
    per_sample = torch.func.vmap(torch.func.jacrev(lambda v: module(v[None])[0]))

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return per_sample(torch.from_numpy(x)).numpy()

    return run


def check_agreement(ours: np.ndarray, reference: np.ndarray) -> None:
    """Per-sample Jacobians agree to float32 precision, except on the rare samples where
    two max-pool candidates are so close that the two libraries' rounding picks different
    winners (both Jacobians are then right for their own forward pass)."""
    assert ours.shape == reference.shape
    scale = np.abs(reference).max()
    bad = np.abs(ours - reference).reshape(len(ours), -1).max(1) > 1e-4 * scale
    assert bad.mean() <= 0.01, f"{bad.sum()} of {len(bad)} per-sample Jacobians differ"


def median_ms(fn, x, repeats: int) -> float:
    fn(x)  # warm-up (allocations, lazy initialisation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=0, help="default: by batch size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cases = [("mlp 500-100-10 softmax", mlp(), (500,), [1, 64, 10_000]),
             ("cnn 1x28x28 (2 conv)", cnn(), (1, 28, 28), [1, 64, 1000])]
    print(f"{'model':<24} {'batch':>6} {'onnx [ms]':>10} {'torch [ms]':>11} {'torch/onnx':>11}")
    for name, module, shape, batches in cases:
        module.eval()
        model = export(module, torch.zeros((2,) + shape))
        onnx_fn, torch_fn = OnnxJacobian(model, 10, args.threads), torch_jacobian(module)
        for batch in batches:
            x = rng.standard_normal((batch,) + shape).astype(np.float32)
            check_agreement(onnx_fn(x), torch_fn(x))
            repeats = args.repeats or (30 if batch <= 64 else 5)
            t_onnx, t_torch = median_ms(onnx_fn, x, repeats), median_ms(torch_fn, x, repeats)
            print(f"{name:<24} {batch:>6} {t_onnx:>10.2f} {t_torch:>11.2f} {t_torch / t_onnx:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
