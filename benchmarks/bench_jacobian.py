"""Per-sample Jacobians: jacli against each framework's own best idiom, on the same weights.

    .venv/bin/python benchmarks/bench_jacobian.py [--threads N] [--startup] [--memory]

Models: the 500-100-10 tanh/softmax MLP of sample_models/ (batch 1, 64, 10,000) and a
small CNN (1x28x28 -> conv 8 -> ReLU -> max-pool -> conv 16 -> ReLU -> max-pool -> 10,
softmax; batch 1, 64, 1,000), each saved as TorchScript, Keras and ONNX with one set of
weights. Per model and batch, in one process:

  jacli-torch / jacli-tf / jacli-onnx   ``jacli.jacobian(model, x)`` on the saved model
  torch vmap(jacrev)                    ``torch.func.vmap(torch.func.jacrev(f))``, eager module
  torch loop                            one ``autograd.grad`` per output (the naive loop)
  tf batch_jacobian                     ``GradientTape.batch_jacobian`` in a ``tf.function``
  tf loop                               one ``tape.gradient`` per output, in a ``tf.function``
  numpy                                 a hand-vectorised forward/backward pass

Every result is checked against the numpy one; then each jacli backend is timed
round-robin with its framework's own idioms (so a burst of load on a shared machine hits
them alike, and no framework runs while another's idle threads still spin) after a
warm-up call; the table gives the minimum and the median. Ratios: each jacli backend over the best native
idiom of its framework (ONNX Runtime has no autodiff, so jacli-onnx is set against numpy).
The floor is the time to write the Jacobian's bytes once at the measured copy bandwidth
(a large numpy copy). ``--startup`` times cold ``jacli compute`` processes (with the ONNX
cache filled, and empty) against ``python -c "import numpy, onnxruntime"``; ``--memory``
measures peak RSS for 100,000 samples of the MLP written to .h5 by every backend. Results
also go to benchmarks/results/<time>.json for comparison over time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="threads per framework (default: all cores)")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per method and case (at least)")
    ap.add_argument("--mlp-batches", default="1,64,10000")
    ap.add_argument("--cnn-batches", default="1,64,1000")
    ap.add_argument("--startup", action="store_true", help="also time cold CLI starts")
    ap.add_argument("--memory", action="store_true",
                    help="also measure peak RSS for 100,000 MLP samples per backend, and for one image's 602 MB Jacobian")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    if args.threads:  # before numpy/torch/TF/onnxruntime start their thread pools
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    report = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), "threads": args.threads or None}
    if not args.skip_speed:
        report["speed"] = speed(args)
    if args.startup:
        report["startup"] = startup()
    if args.memory:
        report["memory"] = memory()
        report["memory_one_image"] = image_memory()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{report['when'].replace(':', '')}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out.relative_to(ROOT)}")


def machine() -> dict:
    return {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "platform": platform.platform(),
            "python": platform.python_version()}


# --- speed ---------------------------------------------------------------------------------
def speed(args) -> list[dict]:
    import numpy as np

    frameworks = setup_frameworks(args.threads)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; threads {args.threads or 'all'}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build, batches in (("mlp", build_mlp, args.mlp_batches), ("cnn", build_cnn, args.cnn_batches)):
            methods, reference, shape = build(Path(tmp), frameworks)
            for batch in [int(b) for b in batches.split(",") if b]:
                x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
                want = reference(x)
                for label, fn in methods.items():
                    check(label, fn(x), want)
                times = {}
                for ours, natives in NATIVE.items():  # each framework's methods among themselves
                    times |= time_round_robin({k: methods[k] for k in (ours, *natives)}, x, args.min_time)
                nbytes = want.nbytes
                ms = {k: {"min": min(v), "median": sorted(v)[len(v) // 2], "runs": len(v)} for k, v in times.items()}
                row = {"model": name, "batch": batch, "jacobian_bytes": nbytes, "floor_ms": 1e3 * nbytes / bandwidth,
                       "ms": ms}
                row["ratios"] = ratios(row["ms"])
                rows.append(row)
                print_row(row)
    print_summary(rows)
    return rows


def setup_frameworks(threads: int) -> dict:
    import onnxruntime as ort
    import tensorflow as tf
    import torch

    if threads:
        torch.set_num_threads(threads)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        base = ort.SessionOptions

        class Options(base):  # jacli's ONNX backend builds its sessions from ort.SessionOptions()
            def __init__(self):
                super().__init__()
                self.intra_op_num_threads = threads

        ort.SessionOptions = Options
    import keras

    return {"torch": torch, "tf": tf, "keras": keras}


def copy_bandwidth() -> float:
    import numpy as np

    a = np.ones(1 << 28, np.uint8)  # 256 MiB
    b = np.empty_like(a)
    b[...] = a  # fault the destination in
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    return a.nbytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_round_robin(methods: dict, x, min_time: float) -> dict[str, list[float]]:
    for fn in methods.values():
        fn(x)  # warm-up: tracing, lazy initialisation, allocations
    times = {k: [] for k in methods}
    start = time.perf_counter()
    while True:
        for k, fn in methods.items():
            times[k].append(1e3 * _timed(lambda: fn(x)))
        runs = len(next(iter(times.values())))
        if runs >= 200 or (runs >= 5 and time.perf_counter() - start > min_time * len(methods)):
            return times


def check(label: str, got, want) -> None:
    """Agreement to float32 precision; with max-pooling, a near-tie between two window
    entries may make a library route one sample's derivative to the other entry."""
    import numpy as np

    got = np.asarray(got).reshape(want.shape)
    bad = np.abs(got - want).reshape(len(want), -1).max(1) > 1e-4 * max(np.abs(want).max(), 1e-30)
    if bad.mean() > 0.01:
        raise SystemExit(f"{label}: {bad.sum()} of {len(bad)} per-sample Jacobians differ from numpy")


NATIVE = {"jacli-torch": ("torch vmap(jacrev)", "torch loop"), "jacli-tf": ("tf batch_jacobian", "tf loop"),
          "jacli-onnx": ("numpy",)}


def ratios(ms: dict) -> dict:
    best_all = min(v["min"] for k, v in ms.items() if not k.startswith("jacli"))
    out = {}
    for ours, natives in NATIVE.items():
        if ours in ms:
            best = min(ms[n]["min"] for n in natives)
            out[ours] = {"vs_native": ms[ours]["min"] / best, "vs_best": ms[ours]["min"] / best_all}
    return out


def print_row(row: dict) -> None:
    print(f"{row['model']} batch {row['batch']}: Jacobian {row['jacobian_bytes'] / 2**20:.2f} MiB, "
          f"floor {row['floor_ms']:.3f} ms")
    for k, v in row["ms"].items():
        r = row["ratios"].get(k, {})
        extra = f"  {r['vs_native']:.2f}x its native best, {r['vs_best']:.2f}x the best" if r else ""
        print(f"  {k:20s} {v['min']:10.3f} ms min {v['median']:10.3f} ms median ({v['runs']} runs){extra}")
    print(flush=True)


def print_summary(rows: list[dict]) -> None:
    head = f"| model | batch | floor (ms) | {' | '.join(NATIVE)} | best native (ms) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in rows:
        cells = []
        for ours in NATIVE:
            v, r = row["ms"][ours]["min"], row["ratios"][ours]["vs_native"]
            cells.append(f"{v:.2f} ms ({r:.2f}x)")
        best = min((v["min"], k) for k, v in row["ms"].items() if not k.startswith("jacli"))
        print(f"| {row['model']} | {row['batch']} | {row['floor_ms']:.3f} | {' | '.join(cells)} | "
              f"{best[0]:.2f} {best[1]} |")


# --- models: one set of weights, every framework ----------------------------------------------
def build_mlp(tmp: Path, fw: dict):
    import numpy as np

    sys.path.insert(0, str(SAMPLES))
    import generate

    import jacli

    torch, tf, keras = fw["torch"], fw["tf"], fw["keras"]
    w = generate.weights()
    nn = torch.nn
    net = nn.Sequential(nn.Linear(500, 100), nn.Tanh(), nn.Linear(100, 10), nn.Softmax(-1))
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(w["W1"].T)), net[0].bias.copy_(torch.from_numpy(w["b1"]))
        net[2].weight.copy_(torch.from_numpy(w["W2"].T)), net[2].bias.copy_(torch.from_numpy(w["b2"]))
    kmodel = keras.saving.load_model(SAMPLES / "mlp.keras", compile=False)
    W1, b1, W2, b2 = w["W1"], w["b1"], w["W2"], w["b2"]
    eye = np.eye(10, dtype=np.float32)

    def numpy_jacobian(x):
        h = np.tanh(x @ W1 + b1)
        z = h @ W2 + b2
        e = np.exp(z - z.max(-1, keepdims=True))
        p = e / e.sum(-1, keepdims=True)
        dz = p[:, :, None] * (eye - p[:, None, :])  # (B, 10, 10): dp_i/dz_j
        return ((dz @ W2.T) * (1 - h * h)[:, None, :]) @ W1.T  # (B, 10, 500)

    methods = {
        "jacli-torch": jacobian_of(jacli.load(str(SAMPLES / "mlp.pt"))),
        "jacli-tf": jacobian_of(jacli.load(str(SAMPLES / "mlp.keras"))),
        "jacli-onnx": jacobian_of(jacli.load(str(SAMPLES / "mlp.onnx"))),
        **torch_idioms(torch, net, 10), **tf_idioms(tf, kmodel, 10), "numpy": numpy_jacobian,
    }
    return methods, numpy_jacobian, (500,)


def build_cnn(tmp: Path, fw: dict):
    import numpy as np

    import jacli

    torch, tf, keras = fw["torch"], fw["tf"], fw["keras"]
    rng = np.random.default_rng(7)
    f32 = np.float32
    k1 = (rng.standard_normal((8, 1, 3, 3)) / 3).astype(f32)
    c1 = (0.1 * rng.standard_normal(8)).astype(f32)
    k2 = (rng.standard_normal((16, 8, 3, 3)) / np.sqrt(72)).astype(f32)
    c2 = (0.1 * rng.standard_normal(16)).astype(f32)
    W = (rng.standard_normal((784, 10)) / 28).astype(f32)
    b = (0.1 * rng.standard_normal(10)).astype(f32)

    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(784, 10), torch.nn.Softmax(-1)).eval()
    with torch.no_grad():
        for layer, (kw, kb) in zip((net[0], net[3], net[7]), ((k1, c1), (k2, c2), (W.T, b))):
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(kw)))
            layer.bias.copy_(torch.from_numpy(kb))
    torch.jit.save(torch.jit.trace(net, torch.zeros(2, 1, 28, 28)), tmp / "cnn.pt")
    export_onnx(torch, net, tmp / "cnn.onnx")

    L = keras.layers
    inp = keras.Input((1, 28, 28), name="x")
    h = L.Permute((2, 3, 1))(inp)  # NCHW in (like torch and ONNX), NHWC inside, CHW order at the flatten
    h = L.MaxPooling2D(2)(L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(h))
    h = L.MaxPooling2D(2)(L.Conv2D(16, 3, padding="same", activation="relu", name="c2")(h))
    y = L.Dense(10, activation="softmax", name="d")(L.Flatten()(L.Permute((3, 1, 2))(h)))
    kmodel = keras.Model(inp, y, name="cnn")
    kmodel.get_layer("c1").set_weights([k1.transpose(2, 3, 1, 0), c1])
    kmodel.get_layer("c2").set_weights([k2.transpose(2, 3, 1, 0), c2])
    kmodel.get_layer("d").set_weights([W, b])
    kmodel.save(tmp / "cnn.keras")

    def numpy_jacobian(x, chunk=64):
        return np.concatenate([_cnn_numpy(x[i:i + chunk], k1, c1, k2, c2, W, b) for i in range(0, len(x), chunk)])

    methods = {
        "jacli-torch": jacobian_of(jacli.load(str(tmp / "cnn.pt"))),
        "jacli-tf": jacobian_of(jacli.load(str(tmp / "cnn.keras"))),
        "jacli-onnx": jacobian_of(jacli.load(str(tmp / "cnn.onnx"))),
        **torch_idioms(torch, net, 10), **tf_idioms(tf, kmodel, 10), "numpy": numpy_jacobian,
    }
    return methods, numpy_jacobian, (1, 28, 28)


def jacobian_of(model):
    import jacli

    return lambda x: jacli.jacobian(model, x)


def export_onnx(torch, net, path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, 1, 28, 28),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})


def torch_idioms(torch, net, m: int) -> dict:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    per_sample = torch.func.vmap(torch.func.jacrev(lambda v: net(v[None])[0]))

    def vmap_jacrev(x):
        return per_sample(torch.from_numpy(x)).numpy()

    def loop(x):
        t = torch.from_numpy(x).requires_grad_(True)
        y = net(t)
        rows = [torch.autograd.grad(y[:, i].sum(), t, retain_graph=i < m - 1)[0] for i in range(m)]
        return torch.stack(rows, 1).numpy()

    return {"torch vmap(jacrev)": vmap_jacrev, "torch loop": loop}


def tf_idioms(tf, kmodel, m: int) -> dict:
    @tf.function(reduce_retracing=True)
    def batch_jacobian(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = kmodel(x, training=False)
        return tape.batch_jacobian(y, x)

    @tf.function(reduce_retracing=True)
    def loop(x):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y = kmodel(x, training=False)
            outs = [y[:, i] for i in range(m)]
        return tf.stack([tape.gradient(o, x) for o in outs], 1)

    return {"tf batch_jacobian": lambda x: batch_jacobian(x).numpy(), "tf loop": lambda x: loop(x).numpy()}


def _cnn_numpy(x, k1, c1, k2, c2, W, b):
    """Per-sample Jacobian of the CNN, (B, 10, 1, 28, 28): forward, then the 10 one-hot
    cotangents pulled back together (convolution VJPs are convolutions with the flipped,
    transposed kernel)."""
    import numpy as np

    a1 = _conv(x, k1) + c1[:, None, None]
    r1 = np.maximum(a1, 0)
    p1, m1 = _pool(r1)
    a2 = _conv(p1, k2) + c2[:, None, None]
    r2 = np.maximum(a2, 0)
    p2, m2 = _pool(r2)
    z = p2.reshape(len(x), -1) @ W + b
    e = np.exp(z - z.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    g = p[:, :, None] * (np.eye(10, dtype=p.dtype) - p[:, None, :])  # (B, 10 rows, 10)
    g = (g @ W.T).reshape(len(x), 10, 16, 7, 7)
    g = _unpool(g, m2) * (a2 > 0)[:, None]
    g = _conv(g.reshape(-1, 16, 14, 14), _vjp_kernel(k2)).reshape(len(x), 10, 8, 14, 14)
    g = _unpool(g, m1) * (a1 > 0)[:, None]
    return _conv(g.reshape(-1, 8, 28, 28), _vjp_kernel(k1)).reshape(len(x), 10, 1, 28, 28)


def _conv(x, k):
    """'same' 3x3 convolution (cross-correlation), NCHW, by one matrix product over patches."""
    import numpy as np

    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # (n, c, h, w, 3, 3)
    cols = patches.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * 9)
    return (cols @ k.reshape(len(k), -1).T).reshape(n, h, w, len(k)).transpose(0, 3, 1, 2)


def _vjp_kernel(k):
    return k[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)


def _pool(x):
    n, c, h, w = x.shape
    windows = x.reshape(n, c, h // 2, 2, w // 2, 2)
    top = windows.max(axis=(3, 5))
    return top, windows == top[:, :, :, None, :, None]


def _unpool(g, mask):
    """Route each pooled derivative to its window's maximum; g: (B, k, C, h, w)."""
    b, k, c, h, w = g.shape
    return (g[:, :, :, :, None, :, None] * mask[:, None]).reshape(b, k, c, 2 * h, 2 * w)


# --- cold start -----------------------------------------------------------------------------
def startup(runs: int = 15) -> dict:
    """Cold processes, as after an install: bytecode cached (here in a temporary folder, even
    where PYTHONDONTWRITEBYTECODE is set), files in the page cache. jacli's ONNX cache
    (JACLI_CACHE_DIR, here a temporary folder) holds the model from the warm-up run on, as
    from a user's second run; the "first run" rows give each run an empty cache."""
    import resource

    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = f"{tmp}/pycache"
        env["JACLI_CACHE_DIR"] = f"{tmp}/cache"
        ad = [sys.executable, "-m", "jacli", "compute", str(SAMPLES / "mlp.onnx"), str(SAMPLES / "mlp_input.npy"),
              "-q", "-o", f"{tmp}/J.npy"]
        fd = [*ad, "--method", "fd"]
        commands = {
            "python -c 'import numpy, onnxruntime'": [sys.executable, "-c", "import numpy, onnxruntime"],
            "jacli compute mlp.onnx (ad)": ad,
            "jacli compute mlp.onnx --method fd": fd,
            "first run (empty cache), ad": ad,
            "first run (empty cache), fd": fd,
        }

        def run(k: str, i) -> None:
            fresh = {"JACLI_CACHE_DIR": f"{tmp}/empty-{i}"} if k.startswith("first run") else {}
            subprocess.run(commands[k], check=True, cwd=ROOT, env={**env, **fresh})

        for k in commands:
            run(k, "warm-up")  # warm the page cache, write the bytecode (and fill the cache)
        wall, cpu = {k: [] for k in commands}, {k: [] for k in commands}
        for i in range(runs):
            for k in commands:
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                wall[k].append(_timed(lambda: run(k, i)))
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu[k].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    base = next(iter(commands))
    out = {}
    print(f"\ncold start, {runs} runs each (min / median), load average {os.getloadavg()[0]:.1f}:")
    for k in commands:
        w, c = sorted(wall[k]), sorted(cpu[k])
        out[k] = {"wall_min": w[0], "wall_median": w[len(w) // 2], "cpu_min": c[0], "cpu_median": c[len(c) // 2]}
        print(f"  {k:40s} wall {w[0]:.3f} / {w[len(w) // 2]:.3f} s ({w[0] / min(wall[base]):.2f}x)   "
              f"cpu {c[0]:.3f} / {c[len(c) // 2]:.3f} s ({c[0] / min(cpu[base]):.2f}x)")
    return out


# --- bounded memory -------------------------------------------------------------------------
def memory(samples: int = 100_000) -> list[dict]:
    import numpy as np

    code = ("import resource, subprocess, sys, time\n"
            "t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); t = time.perf_counter() - t\n"
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, t)\n")
    rows = []
    print(f"\npeak RSS, {samples:,} samples of the MLP written to .h5 (a {samples * 20000 / 1e9:.1f} GB Jacobian):")
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/x.npy", np.random.default_rng(0).standard_normal((samples, 500)).astype(np.float32))
        for model in ("mlp.pt", "mlp.keras", "mlp_savedmodel", "mlp.onnx"):
            cmd = [sys.executable, "-m", "jacli", "compute", str(SAMPLES / model), f"{tmp}/x.npy", "-o", f"{tmp}/J.h5",
                   "-q"]
            r = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, cwd=ROOT, check=True)
            rc, kib, seconds = r.stdout.split()
            row = {"model": model, "samples": samples, "returncode": int(rc), "peak_rss_mb": int(kib) / 1024,
                   "seconds": float(seconds)}
            rows.append(row)
            print(f"  {model:16s} peak RSS {row['peak_rss_mb']:7.0f} MiB  {row['seconds']:6.1f} s  (exit {rc})")
    return rows


def image_memory() -> list[dict]:
    """One 3x224x224 image through a 1000-class conv net (TorchScript): a 602 MB Jacobian for
    a single sample, written to .h5 with a 256 MiB budget (streamed in row parts) and with
    the default budget (the sample held whole); a few rows checked against torch autograd."""
    import h5py
    import numpy as np
    import torch

    code = ("import resource, subprocess, sys, time\n"
            "t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); t = time.perf_counter() - t\n"
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, t)\n")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 7, stride=4, padding=3), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 1000)).eval()
    x = torch.randn(1, 3, 224, 224)
    rows = []
    print("\npeak RSS, one 3x224x224 image, 1000 classes (a 602 MB Jacobian) to .h5:")
    with tempfile.TemporaryDirectory() as tmp:
        torch.jit.trace(net, x).save(f"{tmp}/cls.pt")
        np.save(f"{tmp}/img.npy", x.numpy())
        for budget in ("256M", None):
            cmd = [sys.executable, "-m", "jacli", "compute", f"{tmp}/cls.pt", f"{tmp}/img.npy", "-o", f"{tmp}/J.h5", "-q",
                   *(["--max-memory", budget] if budget else [])]
            r = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, cwd=ROOT, check=True)
            rc, kib, seconds = r.stdout.split()
            with h5py.File(f"{tmp}/J.h5") as f:
                picks = [0, 417, 999]
                got = np.stack([f["doutput/dinput"][0, i] for i in picks])
            xg = x.clone().requires_grad_(True)
            want = np.stack([torch.autograd.grad(net(xg)[0, i], xg)[0][0].numpy() for i in picks])
            error = float(np.abs(got - want).max() / np.abs(want).max())
            row = {"budget": budget or "default", "returncode": int(rc), "peak_rss_mb": int(kib) / 1024,
                   "seconds": float(seconds), "max_rel_error_vs_torch": error}
            rows.append(row)
            print(f"  --max-memory {row['budget']:8s} peak RSS {row['peak_rss_mb']:6.0f} MiB  {row['seconds']:5.1f} s  "
                  f"rows 0/417/999 vs torch.autograd: {error:.1e}  (exit {rc})")
    return rows


if __name__ == "__main__":
    main()
