"""Per-sample Jacobians of real architectures: jacli against each framework's best idiom.

    .venv/bin/python benchmarks/bench_real.py [--threads 1,2] [--quick] [--skip-speed]
                                              [--memory] [--startup] [--big] [--large] [--allocator]

Speed (one child process per thread count, so that every framework starts its thread pools
with that count; JACLI_THREADS is set to it too). Models (benchmarks/real_models.py, random
weights; image networks at 3x64x64 with 10 classes, as in issue 15): a 48x48 LSTM and GRU, a
Conv1d-GELU-Conv1d-Tanh 64x64 net, a 256x256 transformer block, ResNet-18,
MobileNetV3-small, EfficientNet-B0, each saved as a traced TorchScript file, a torch.export
.pt2 and ONNX; and Keras' own MobileNetV3Small and ResNet50 (weights=None, 64x64x3) as
.keras, .h5 (Keras 3's legacy file, which Keras itself cannot read back for MobileNetV3), a
SavedModel and ONNX (tf2onnx, opset 17). Per model and batch, in one process, on the same weights:

  jacli <format>        ``jacli.jacobian(jacli.load(file), x)``
  torch vmap(jacrev)    ``torch.func.vmap(torch.func.jacrev(f))`` on the eager module
  torch vmap(jacfwd)    the same with ``jacfwd``
  tf batch_jacobian     ``GradientTape.batch_jacobian`` inside a ``tf.function``
  tf batch_jacobian (XLA)  the same with ``jit_compile=True`` (compiled in its warm-up call)
  floor                 min(m, n) x one batched VJP (m <= n) or JVP on the eager module /
                        Keras model: what any method needs if one product costs as much
                        as one batched pass

ONNX Runtime has no autodiff: jacli-onnx is set against the best idiom of the framework the
model came from. Methods are timed round-robin after a warm-up call (a burst of load hits
all alike; jacli's methods get more, until one runs no tuner trial and none is owed: the
steady state of a loop, where jacli buys XLA's compile once the calls have paid for it; at
most SETTLE_S seconds), the minimum
of the wall and of the CPU times is reported; every result is checked against ``vmap(jacrev)``
(or ``batch_jacobian``) first.

``--memory``: peak RSS of ``jacli compute MODEL x.npy -o J.h5 -q --max-memory 256M`` in
both modes (MobileNetV3-small at 3x32x32 as TorchScript, .pt2 and ONNX, and Keras'
MobileNetV3Small as .keras and a SavedModel), and of
``jacli inspect`` on the same file (the model itself). ``--startup``: time to the first
line of ``jacli inspect`` per format, cold processes, against importing the framework and
loading the model with its own API. ``--big``: ResNet-18 with 1000 classes on one 3x224x224
image (a 602 MB Jacobian) to .h5, against ``torch.func.jacrev(f, chunk_size=100)`` and the
floor (1000 x one VJP), once per ``--threads`` count. ``--large``: only the large batches
(image networks at 256 samples, the Keras applications at 16 and 256 / 4 and 16), each method
timed 3 times. ``--allocator``: ``jacli compute`` on 20,000 / 2,000 samples of the Conv1d net and the
transformer block (traced, ONNX) with its allocator settings and with ``JACLI_MALLOC=off``.
Tables are printed and written to benchmarks/results/real-<time>.{json,md}.
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
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

# model -> batches (full run, --quick, --large)
CASES = {
    "lstm": ((1, 16, 256), (1, 16), ()),
    "gru": ((1, 16, 256), (1, 16), ()),
    "conv1d": ((1, 16, 256), (1, 16), ()),
    "transformer": ((1, 16, 256), (1, 16), ()),
    # image networks at 256 samples take 3-25 s per call and method: only with --large, timed fewer times
    "resnet18": ((1, 4, 16), (1,), (256,)),
    "mobilenet_v3_small": ((1, 4, 16), (1,), (256,)),
    "efficientnet_b0": ((1, 4, 16), (1,), (256,)),
    "keras_mobilenet_v3_small": ((1, 4), (1,), (16, 256)),
    "keras_resnet50": ((1,), (1,), (4, 16)),  # 23.6 M parameters: 0.6 s per Jacobian and sample
}
# Keras applications (weights=None, 64x64x3, 10 classes): the application and its options
KERAS_APPS = {"keras_mobilenet_v3_small": ("MobileNetV3Small", {"include_preprocessing": False}),
              "keras_resnet50": ("ResNet50", {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="thread counts, one speed run each (default 1,2)")
    ap.add_argument("--quick", action="store_true", help="fewer batch sizes")
    ap.add_argument("--large", action="store_true",
                    help="only the large batches (image networks at 256 samples, Keras at 16/256 and 4/16), "
                         "each method timed 3 times")
    ap.add_argument("--models", default=",".join(CASES))
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per method and case (at least)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--startup", action="store_true")
    ap.add_argument("--tuned", action="store_true",
                    help="speed runs with the command line's allocator settings in the process (api.tune_allocator): "
                         "every method alike")
    ap.add_argument("--allocator", action="store_true",
                    help="jacli compute with and without its allocator settings (JACLI_MALLOC=off)")
    ap.add_argument("--big", action="store_true", help="the 1000 x 150528 ResNet-18 Jacobian, once per thread count")
    ap.add_argument("--merge", help="RUN.json,RUN.json,...: one set of speed tables from earlier runs (a full "
                    "run and a --large one), printed and written to benchmarks/results/merged-*.md; runs nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: one speed run, results to this file
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.merge:
        return merge(args.merge.split(","))
    started = time.perf_counter()
    report = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), "speed": {}}
    md = [f"Machine: {report['machine']['cpus']} CPUs ({report['machine']['cpu']}), load average {report['machine']['load_average'][0]:.1f} "
          f"at the start; {report['machine']['platform']}, Python {report['machine']['python']}\n"]
    if not args.skip_speed:
        for n in [int(t) for t in args.threads.split(",") if t]:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                cmd = [sys.executable, __file__, "--child", out.name, "--threads", str(n), "--models", args.models,
                       "--min-time", str(args.min_time), *(["--quick"] if args.quick else []),
                       *(["--large"] if args.large else []), *(["--tuned"] if args.tuned else [])]
                subprocess.run(cmd, check=True, env=thread_env(n), cwd=ROOT)
                rows = json.loads(Path(out.name).read_text())
            report["speed"][n] = rows
            md += speed_table(rows, n, args.tuned)
    if args.memory:
        report["memory"] = memory()
        md += memory_table(report["memory"])
    if args.startup:
        report["startup"] = startup()
        md += startup_table(report["startup"])
    if args.allocator:
        report["allocator"] = allocator(int(args.threads.split(",")[0]))
        md += allocator_table(report["allocator"])
    if args.big:
        report["big"] = [big(int(n)) for n in args.threads.split(",") if n]
        for r in report["big"]:
            md += big_table(r)
    report["seconds"] = time.perf_counter() - started
    text = "\n".join(md)
    print("\n" + text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"real-{report['when'].replace(':', '')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {stem.relative_to(ROOT)}.json and .md ({report['seconds']:.0f} s in all)")


def merge(paths: list[str]) -> None:
    """One set of speed tables from several runs' JSON (a full run and a --large one): rows
    by model and batch, a later file's row replacing an earlier one's."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    order = list(CASES)
    md = [f"Merged from {', '.join(Path(p).stem for p in paths)}; machine of the first: {reports[0]['machine']['cpu']}\n"]
    for n in sorted({t for r in reports for t in r["speed"]}, key=int):
        rows = {(row["model"], row["batch"]): row for r in reports for row in r["speed"].get(n, [])}
        md += speed_table([rows[k] for k in sorted(rows, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[1]))], int(n))
    text = "\n".join(md)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / ("merged-" + "+".join(Path(p).stem.removeprefix("real-") for p in paths))
    stem.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {stem.relative_to(ROOT)}.md")


def machine() -> dict:
    return {"cpus": os.cpu_count(), "cpu": cpu_model(), "load_average": os.getloadavg(),
            "platform": platform.platform(), "python": platform.python_version()}


def cpu_model() -> str:
    """The CPU's model name and widest vector extension (the kernels differ by them: TensorFlow's
    plain batch_jacobian beat XLA on an AVX-512 EPYC and lost to it on the machine before)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    isa = next((f for f in ("avx512f", "avx2", "avx", "sse4_2", "asimd") if f in flags), "")
    return f"{name} ({isa.upper()})" if isa else name


def thread_env(n: int) -> dict:
    env = {**os.environ, "JACLI_THREADS": str(n), "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(n)
    return env


# --- speed (in a child per thread count) ------------------------------------------------------
def child(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(int(args.threads))
    if any(name.startswith("keras") for name in args.models.split(",")):
        # before Keras builds anything: TensorFlow's thread pools take their sizes when its runtime
        # starts, and jacli's own setting is then too late (until this, the "1 thread" Keras rows
        # ran TensorFlow's default pools: CPU time up to 1.8x the wall time)
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(int(args.threads))
        tf.config.threading.set_inter_op_parallelism_threads(int(args.threads))
    warnings.filterwarnings("ignore")
    if args.tuned:
        from jacli.api import tune_allocator

        print(f"allocator: {tune_allocator()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            full, quick, large = CASES[name]
            if args.large and not large:
                continue
            setup = keras_case if name.startswith("keras") else torch_case
            methods, shape, floor_of, m, n = setup(name, Path(tmp))
            for batch in large if args.large else quick if args.quick else full:
                x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
                row = {"model": name, "batch": batch, "m": m, "n": n, "ms": {}, "error": {}, "skipped": {}}
                ok = {}
                want = None
                for label, fn in methods.items():
                    try:
                        got = np.asarray(fn(x)).reshape(batch, m, n)
                    except Exception as e:  # a format or idiom that cannot take this model
                        row["skipped"][label] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                        continue
                    want = got if want is None else want
                    per_sample = np.abs(got - want).max(axis=(1, 2)) / max(np.abs(want).max(), 1e-30)
                    row["error"][label] = float(per_sample.max())
                    # samples off by more than float32 rounding: at a kink (a max-pool near-tie, a ReLU input
                    # within rounding of 0), where two float32 evaluations can take different sides
                    row.setdefault("kink_samples", {})[label] = int((per_sample > KINK).sum())
                    ok[label] = fn
                    if hasattr(fn, "model"):
                        row.setdefault("settle_s", {})[label] = round(settle(fn, x), 1)
                times, cpu, faults = time_round_robin(ok, x, args.min_time, runs=3 if args.large else RUNS)
                row["faults"] = {k: int(np.median(v)) for k, v in faults.items()}
                row["ms"] = {k: min(v) for k, v in times.items()}
                row["cpu_ms"] = {k: min(v) for k, v in cpu.items()}
                row["median_ms"] = {k: float(np.median(v)) for k, v in times.items()}
                row["floor_ms"] = 1e3 * floor_of(x)
                row["strategy"] = {k: strategy_used(fn) for k, fn in ok.items() if hasattr(fn, "model")}
                rows.append(row)
                print_row(row, flush=True)
    Path(args.child).write_text(json.dumps(rows))


def torch_case(name: str, tmp: Path):
    """Methods for one torch architecture: jacli on its three files, torch.func on the module."""
    import numpy as np
    import torch
    from real_models import build

    import jacli

    net, shape = build(name)
    example = torch.zeros(2, *shape)
    m, n = int(np.prod(net(example[:1]).shape[1:])), int(np.prod(shape))
    files = {}
    files["jacli .pt"] = _saved(tmp / f"{name}.pt", lambda p: torch.jit.trace(net, example).save(str(p)))
    files["jacli .pt2"] = _saved(tmp / f"{name}.pt2", lambda p: torch.export.save(
        torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},)), str(p)))
    files["jacli .onnx"] = _saved(tmp / f"{name}.onnx", lambda p: torch.onnx.export(
        net, (example,), str(p), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}))
    f = lambda v: net(v[None])[0]  # noqa: E731
    chunk = max(1, (64 << 20) // (4 * n * 8))  # rows per vmap chunk: ~64 MiB of cotangent work
    rev = torch.func.vmap(torch.func.jacrev(f, chunk_size=chunk if m > chunk else None))
    fwd = torch.func.vmap(torch.func.jacfwd(f, randomness="same"))
    methods = {"torch vmap(jacrev)": lambda x: rev(torch.from_numpy(x)).numpy()}  # the first: the reference
    if n <= 4096:  # forward mode over 12,288 image columns is not anyone's idiom for a 10-class net
        methods["torch vmap(jacfwd)"] = lambda x: fwd(torch.from_numpy(x)).numpy()
    try:
        rev(example)
    except RuntimeError:  # torch.func cannot vmap this module (nn.GRU writes its state in place): a loop of jacrev
        one = torch.func.jacrev(f)
        methods = {"torch jacrev loop": lambda x: torch.stack([one(v) for v in torch.from_numpy(x)]).numpy()}
    for label, path in files.items():
        if isinstance(path, str):  # the error that prevented saving
            methods[label] = _failing(path)
            continue
        try:
            model = jacli.load(str(path))
            methods[label] = _jacli(model)
        except Exception as e:
            methods[label] = _failing(f"{type(e).__name__}: {e}")

    def floor(x):
        t = torch.from_numpy(x)
        if m <= n:
            def one():
                with torch.enable_grad():
                    tx = t.clone().requires_grad_(True)
                    y = net(tx)
                    torch.autograd.grad(y, tx, torch.ones_like(y))
        else:
            def one():
                torch.func.jvp(net, (t,), (torch.ones_like(t),))
        return min(m, n) * best_of(one)

    return methods, shape, floor, m, n


def keras_case(name: str, tmp: Path):
    """A Keras application (KERAS_APPS, channels last): jacli on .keras, .h5, a SavedModel and
    ONNX (tf2onnx), and GradientTape.batch_jacobian."""
    import keras
    import numpy as np
    import tensorflow as tf
    from bench_jacobian import tf_idioms

    import jacli

    shape = (64, 64, 3)
    keras.utils.set_random_seed(0)
    app, options = KERAS_APPS[name]
    kmodel = getattr(keras.applications, app)(input_shape=shape, weights=None, classes=10, **options)
    kmodel.save(tmp / f"{name}.keras")
    kmodel.export(str(tmp / f"{name}_savedmodel"), verbose=False)
    files = {"jacli .keras": tmp / f"{name}.keras", "jacli savedmodel": tmp / f"{name}_savedmodel"}
    files["jacli .h5"] = _saved(tmp / f"{name}.h5", lambda p: kmodel.save(p))

    def onnx(p):
        import logging

        import onnx
        import tf2onnx

        # its transpose optimiser fails on MobileNetV3's squeeze-excite (an empty bias), logs the
        # traceback, and converts without it: the graph keeps its NHWC transposes
        logging.getLogger("tf2onnx").setLevel(logging.ERROR)

        spec = tf.TensorSpec((None, *shape), tf.float32, name="x")
        onnx.save(tf2onnx.convert.from_keras(kmodel, input_signature=(spec,), opset=17)[0], str(p))

    files["jacli .onnx"] = _saved(tmp / f"{name}.onnx", onnx)
    m, n = 10, int(np.prod(shape))
    methods = {}
    for label, path in files.items():
        if isinstance(path, str):  # the error that prevented saving
            methods[label] = _failing(path)
            continue
        try:
            methods[label] = _jacli(jacli.load(str(path)))
        except Exception as e:
            methods[label] = _failing(f"{type(e).__name__}: {e}")

    @tf.function(reduce_retracing=True)
    def one_vjp(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = kmodel(x, training=False)
        return tape.gradient(y, x, output_gradients=tf.ones_like(y))

    methods["tf batch_jacobian"] = tf_idioms(tf, kmodel, m)["tf batch_jacobian"]

    @tf.function(reduce_retracing=True, jit_compile=True)
    def batch_jacobian_xla(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = kmodel(x, training=False)
        return tape.batch_jacobian(y, x)

    methods["tf batch_jacobian (XLA)"] = lambda x: batch_jacobian_xla(x).numpy()

    def floor(x):
        t = tf.constant(x)
        one_vjp(t)
        return min(m, n) * best_of(lambda: one_vjp(t).numpy())

    idioms = {k: methods.pop(k) for k in ("tf batch_jacobian", "tf batch_jacobian (XLA)")}
    return {**idioms, **methods}, shape, floor, m, n


def _jacli(model):
    import jacli

    def fn(x):
        return jacli.jacobian(model, x)

    fn.model = model
    return fn


def settle(fn, x) -> float:
    """Untimed calls of a jacli method until one runs no tuner trial (a strategy on trial or a
    loser re-timed, or a mode still owed a trial) and no tuner that this call used is waiting
    to buy a compile (XLA: a trial, or the winner on a new shape, waits until the calls of
    those shapes have cost 1.5x the tuner's first call, or the last compile),
    for at most SETTLE_S seconds: the timed runs are then the steady state of a loop. A
    Jacobian of many backend calls (an image network at 256 samples) finishes its trials
    within the first call; one of a single call takes several. The seconds it took."""
    from jacli.engine import strategies

    engine = strategies.memo(fn.model)
    start = time.perf_counter()
    while time.perf_counter() - start < SETTLE_S:
        before, runs = engine.trials, {k: sum(t.runs.values()) for k, t in engine.tuners.items()}
        fn(x)
        used = [t for k, t in engine.tuners.items() if sum(t.runs.values()) != runs.get(k, 0)]
        if engine.trials == before and not any(t.waiting for t in used) and not any(
                t.trial() for t in engine.modes.values()):
            break
    return time.perf_counter() - start


def strategy_used(fn) -> str:
    """The modes and strategies jacli's tuners settled on (those past their trial runs)."""
    from jacli.engine import strategies

    engine = strategies.memo(fn.model)
    modes = sorted({t.winner() for t in engine.modes.values() if not t.trial()})
    tuners = engine.tuners.values()
    return ",".join(modes + sorted({t.winner() for t in tuners if sum(t.runs.values()) > 2 * len(t.strategies)}))


def _saved(path: Path, save):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save(path)
        return path
    except Exception as e:
        return f"cannot save: {type(e).__name__}: {str(e).splitlines()[0][:160]}"


def _failing(reason: str):
    def fail(x):
        raise RuntimeError(reason)

    return fail


def best_of(fn, runs: int = 5) -> float:
    fn()
    return min(_timed(fn) for _ in range(runs))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_round_robin(methods: dict, x, min_time: float, runs: int) -> tuple[dict, dict, dict]:
    """Wall and CPU milliseconds and minor page faults of each run: at least ``runs`` rounds,
    more while they take under ``min_time`` per method (up to 100). With one thread the CPU
    time is the work itself, which the other processes of a loaded machine inflate far less
    than the wall time; the page faults tell a run that reused the allocator's memory from
    one that had it handed back to the kernel and faulted in again."""
    import resource

    times, cpu, faults = {k: [] for k in methods}, {k: [] for k in methods}, {k: [] for k in methods}
    start = time.perf_counter()
    while methods:
        for k, fn in methods.items():
            c, f = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[k].append(1e3 * _timed(lambda: fn(x)))
            cpu[k].append(1e3 * (time.process_time() - c))
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
        done = len(next(iter(times.values())))
        if done >= 100 or (done >= runs and time.perf_counter() - start > min_time * len(methods)):
            break
    return times, cpu, faults


BASELINE = ("torch vmap(jacrev)", "torch vmap(jacfwd)", "torch jacrev loop", "tf batch_jacobian",
            "tf batch_jacobian (XLA)")
# seconds of untimed calls of each jacli method after its first, at most (settle): the strategy
# tuner's trials and, where rows and columns are within 2x, the mode tuner's, which would
# otherwise take up the few timed runs of a slow cell; and XLA's compile, which the tuner buys
# once the calls have cost 1.5x the first (a Keras MobileNetV3Small at 1 sample: after ~20 s)
SETTLE_S = 150
# timed rounds at least (--large: 3): the minimum of 3 moved by up to 10% between runs on the
# image networks' parity cells, where one call takes 0.2-1.5 s
RUNS = 5


KINK = 1e-4  # of the largest entry: a sample further from the reference than float32 rounding


def _kinks(row, label) -> str:
    n = row.get("kink_samples", {}).get(label, 0)
    return f"; {n} of {row['batch']} samples beyond {KINK:g}" if n else ""


def best_idiom(row, clock: str = "ms") -> tuple[str, float]:
    return min(((k, v) for k, v in row[clock].items() if k in BASELINE), key=lambda kv: kv[1])


def print_row(row, flush=False) -> None:
    label, best = best_idiom(row)
    cpu_best = best_idiom(row, "cpu_ms")[1]
    med_best = best_idiom(row, "median_ms")[1]
    print(f"{row['model']} batch {row['batch']} ({row['m']}x{row['n']}): best idiom {label} {best:.2f} ms, "
          f"floor {row['floor_ms']:.2f} ms", flush=flush)
    for k, v in row["ms"].items():
        cpu = row["cpu_ms"][k]
        print(f"  {k:20s} {v:10.2f} ms  {v / best:5.2f}x the best idiom  {v / row['floor_ms']:6.2f}x the floor  "
              f"CPU {cpu:9.2f} ms {cpu / cpu_best:5.2f}x  median {row['median_ms'][k] / med_best:5.2f}x  "
              f"(max rel. difference {row['error'][k]:.1e}"
              f"{'; %d page faults a call' % row['faults'][k] if row.get('faults', {}).get(k) else ''}"
              f"{'; ' + row['strategy'][k] if row.get('strategy', {}).get(k) else ''}"
              f"{'; settled in %.1f s' % row['settle_s'][k] if k in row.get('settle_s', {}) else ''}"
              f"{_kinks(row, k)})", flush=flush)
    for k, why in row["skipped"].items():
        print(f"  {k:20s} n/a: {why}", flush=flush)


def _short(label: str) -> str:
    return label.replace("torch ", "").replace("tf ", "")


def speed_table(rows, threads: int, tuned: bool = False) -> list[str]:
    cols = ["jacli .pt", "jacli .pt2", "jacli .onnx", "jacli .keras", "jacli .h5", "jacli savedmodel"]
    how = ", allocator tuned (api.tune_allocator)" if tuned else ""
    out = [f"\n### Speed, {threads} thread{'s' if threads > 1 else ''}{how}: ms per call (ratio to the best idiom)\n",
           "| model | m×n | batch | best idiom (ms) | " + " | ".join(cols) + " | jacli best / floor |",
           "|---|---|---|---|" + "---|" * len(cols) + "---|"]
    for row in rows:
        label, best = best_idiom(row)
        cells = []
        for c in cols:
            if c in row["ms"]:
                cells.append(f"{row['ms'][c]:.1f} ({row['ms'][c] / best:.2f}×)")
            else:
                cells.append("n/a" if c in row["skipped"] else "")
        ours = min(v for k, v in row["ms"].items() if k.startswith("jacli")) if any(
            k.startswith("jacli") for k in row["ms"]) else float("nan")
        idiom = _short(label)
        out.append(f"| {row['model']} | {row['m']}×{row['n']} | {row['batch']} | {best:.1f} {idiom} | "
                   + " | ".join(cells) + f" | {ours / row['floor_ms']:.2f} |")
    out += [f"\nCPU time of the same runs (min), as a ratio to the best idiom's: with one thread the work itself, "
            "which load from other processes inflates far less than the wall time\n",
            "| model | batch | best idiom CPU (ms) | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for row in rows:
        label, best = best_idiom(row, "cpu_ms")
        cells = [f"{row['cpu_ms'][c] / best:.2f}×" if c in row["cpu_ms"] else "n/a" if c in row["skipped"] else ""
                 for c in cols]
        out.append(f"| {row['model']} | {row['batch']} | {best:.1f} {_short(label)} | " + " | ".join(cells) + " |")
    out += ["\nMedian wall time of the same runs, as a ratio to the best idiom's median: where a method's "
            "runs take two levels (the allocator's state: memory reused, or page-faulted in again) the minimum "
            "shows the better level only\n",
            "| model | batch | best idiom median (ms) | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for row in rows:
        if "median_ms" not in row:  # results written before the medians were
            continue
        label, best = best_idiom(row, "median_ms")
        cells = [f"{row['median_ms'][c] / best:.2f}×" if c in row["median_ms"] else "n/a" if c in row["skipped"]
                 else "" for c in cols]
        out.append(f"| {row['model']} | {row['batch']} | {best:.1f} {_short(label)} | " + " | ".join(cells) + " |")
    skipped = {(row["model"], k): why for row in rows for k, why in row["skipped"].items()}
    for (model, k), why in skipped.items():
        out.append(f"\nn/a {model} {k}: {why}")
    for row in rows:
        far = {k: n for k, n in row.get("kink_samples", {}).items() if n}
        if far:
            out.append(f"\n{row['model']} at {row['batch']}: off the reference by more than {KINK:g} of its largest "
                       "entry in " + ", ".join(f"{n} sample(s) ({k}, at most {row['error'][k]:.1e})" for k, n in far.items()))
    return out


# --- peak memory ---------------------------------------------------------------------------
_RSS = ("import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "t = time.perf_counter() - t\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, t)\n"
        "sys.stderr.write(r.stderr[-500:])\n")


def peak(cmd: list[str], env=None) -> tuple[int, float, float]:
    r = subprocess.run([sys.executable, "-c", _RSS, *cmd], capture_output=True, text=True, cwd=ROOT, env=env)
    rc, kib, seconds = r.stdout.split()
    return int(rc), int(kib) / 1024, float(seconds)


def memory() -> list[dict]:
    import numpy as np
    import torch
    from real_models import build

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        net, shape = build("mobilenet_v3_small", size=32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            example = torch.zeros(2, *shape)
            torch.jit.trace(net, example).save(f"{tmp}/mnv3.pt")
            torch.export.save(torch.export.export(net, (example,), dynamic_shapes=(
                {0: torch.export.Dim("batch", max=4096)},)), f"{tmp}/mnv3.pt2")
            torch.onnx.export(net, (example,), f"{tmp}/mnv3.onnx", dynamo=False, opset_version=17, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        np.save(f"{tmp}/x_nchw.npy", np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32))
        code = ("import keras\nm = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, "
                "classes=10, include_preprocessing=False)\nimport sys\nm.export(sys.argv[1], verbose=False)\nm.save(sys.argv[2])\n")
        subprocess.run([sys.executable, "-c", code, f"{tmp}/mnv3_savedmodel", f"{tmp}/mnv3.keras"], check=True,
                       env=thread_env(2), capture_output=True)
        np.save(f"{tmp}/x_nhwc.npy", np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32))
        jacli_cmd = [sys.executable, "-m", "jacli"]
        for model, x in (("mnv3.pt", "x_nchw.npy"), ("mnv3.pt2", "x_nchw.npy"), ("mnv3.onnx", "x_nchw.npy"),
                         ("mnv3.keras", "x_nhwc.npy"), ("mnv3_savedmodel", "x_nhwc.npy")):
            _, base, _ = peak([*jacli_cmd, "inspect", f"{tmp}/{model}"])
            for mode in ("reverse", "forward"):
                rc, mb, seconds = peak([*jacli_cmd, "compute", f"{tmp}/{model}", f"{tmp}/{x}", "-o", f"{tmp}/J.h5",
                                        "-q", "--mode", mode, "--max-memory", "256M"])
                row = {"model": model, "mode": mode, "returncode": rc, "peak_mb": mb, "inspect_peak_mb": base,
                       "seconds": seconds}
                rows.append(row)
                print(f"  {model:16s} {mode:8s} peak {mb:6.0f} MiB (inspect alone {base:.0f} MiB), {seconds:.1f} s, "
                      f"exit {rc}", flush=True)
    return rows


def memory_table(rows) -> list[str]:
    out = ["\n### Peak memory: MobileNetV3-small, 3×32×32 → 10, one sample, `--max-memory 256M`\n",
           "| file | mode | peak RSS | `jacli inspect` peak (the model) | above it | wall time |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['mode']} | {r['peak_mb']:.0f} MiB | {r['inspect_peak_mb']:.0f} MiB | "
                   f"{r['peak_mb'] - r['inspect_peak_mb']:.0f} MiB | {r['seconds']:.1f} s |")
    return out


# --- start-up ------------------------------------------------------------------------------
def startup(runs: int = 3) -> list[dict]:
    import torch
    from real_models import build

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        net, shape = build("resnet18")
        example = torch.zeros(2, *shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(net, example).save(f"{tmp}/m.pt")
            torch.export.save(torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("b")},)),
                              f"{tmp}/m.pt2")
            torch.onnx.export(net, (example,), f"{tmp}/m.onnx", dynamo=False, opset_version=17, input_names=["x"],
                              dynamic_axes={"x": {0: "b"}})
        code = ("import keras\nm = keras.applications.MobileNetV3Small(input_shape=(64, 64, 3), weights=None, "
                "classes=10, include_preprocessing=False)\nimport sys\nm.save(sys.argv[1] + '/m.keras')\n"
                "m.export(sys.argv[1] + '/m_savedmodel', verbose=False)\n")
        subprocess.run([sys.executable, "-c", code, tmp], check=True, env=thread_env(2), capture_output=True)
        own = {
            "m.pt": "import torch; torch.jit.load('{p}')",
            "m.pt2": "import torch; torch.export.load('{p}').module()",
            "m.onnx": "import onnxruntime as ort; ort.InferenceSession('{p}', providers=['CPUExecutionProvider'])",
            "m.keras": "import keras; keras.saving.load_model('{p}', compile=False)",
            "m_savedmodel": "import tensorflow as tf; tf.saved_model.load('{p}').signatures['serving_default']",
        }
        env = {**thread_env(2), "JACLI_CACHE_DIR": f"{tmp}/cache"}
        for f, load in own.items():
            path = f"{tmp}/{f}"
            commands = {"own API": [sys.executable, "-c", load.format(p=path)],
                        "jacli inspect": [sys.executable, "-m", "jacli", "inspect", path]}
            first_line({"x": commands["jacli inspect"]}["x"], env)  # warm the page cache (and jacli's ONNX cache)
            times = {k: [] for k in commands}
            for _ in range(runs):
                for k, cmd in commands.items():
                    times[k].append(first_line(cmd, env))
            row = {"file": f, **{k: min(v) for k, v in times.items()}}
            rows.append(row)
            print(f"  {f:14s} own API {row['own API']:.2f} s, jacli inspect first line {row['jacli inspect']:.2f} s "
                  f"({row['jacli inspect'] / row['own API']:.2f}x)", flush=True)
    return rows


def first_line(cmd, env) -> float:
    """Seconds until the command prints its first line (or exits, for one that prints nothing)."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    p.stdout.readline()
    elapsed = time.perf_counter() - start
    p.stdout.read()
    if p.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    return elapsed


def startup_table(rows) -> list[str]:
    out = ["\n### Start-up: time to the first line of `jacli inspect` vs the framework's own load (cold processes, "
           "best of 3)\n", "| file | import + load with the framework's API | `jacli inspect` first line | ratio |",
           "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['file']} | {r['own API']:.2f} s | {r['jacli inspect']:.2f} s | "
                   f"{r['jacli inspect'] / r['own API']:.2f}× |")
    return out


# --- the command line's allocator settings --------------------------------------------------
def allocator(threads: int, runs: int = 3) -> list[dict]:
    """``jacli compute MODEL x.npy -o J.h5 -q`` on many samples of the Conv1d net (20,000) and
    the transformer block (2,000), traced and ONNX, with jacli's allocator settings (its own
    process keeps freed memory for reuse: system.tune_allocator) and with JACLI_MALLOC=off,
    interleaved, best of ``runs``."""
    import numpy as np
    import torch
    from real_models import build

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, samples in (("conv1d", 20000), ("transformer", 2000)):
            net, shape = build(name)
            example = torch.zeros(2, *shape)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.trace(net, example).save(f"{tmp}/{name}.pt")
                torch.onnx.export(net, (example,), f"{tmp}/{name}.onnx", dynamo=False, opset_version=17,
                                  input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
            np.save(f"{tmp}/x.npy", np.random.default_rng(0).standard_normal((samples, *shape)).astype(np.float32))
            for suffix in (".pt", ".onnx"):
                got = {"on": [], "off": []}
                for _ in range(runs):
                    for setting in got:
                        env = {**thread_env(threads), "JACLI_MALLOC": "" if setting == "on" else "off"}
                        rc, mb, seconds = peak([sys.executable, "-m", "jacli", "compute", f"{tmp}/{name}{suffix}",
                                                f"{tmp}/x.npy", "-o", f"{tmp}/J.h5", "-q"], env=env)
                        got[setting].append((seconds, mb, rc))
                row = {"model": f"{name}{suffix}", "samples": samples, "threads": threads,
                       **{f"{k}_seconds": min(t for t, _, _ in v) for k, v in got.items()},
                       **{f"{k}_peak_mb": max(m for _, m, _ in v) for k, v in got.items()},
                       "returncodes": sorted({rc for v in got.values() for _, _, rc in v})}
                rows.append(row)
                print(f"  {row['model']:16s} {samples} samples: {row['off_seconds']:.2f} s -> {row['on_seconds']:.2f} s, "
                      f"peak {row['off_peak_mb']:.0f} -> {row['on_peak_mb']:.0f} MiB", flush=True)
    return rows


def allocator_table(rows) -> list[str]:
    out = [f"\n### `jacli compute` with its allocator settings ({rows[0]['threads']} thread(s), best of 3, to .h5)\n",
           "| file | samples | `JACLI_MALLOC=off` | default | speed-up | peak RSS off / default |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['samples']:,} | {r['off_seconds']:.2f} s | {r['on_seconds']:.2f} s | "
                   f"{r['off_seconds'] / r['on_seconds']:.2f}× | {r['off_peak_mb']:.0f} / {r['on_peak_mb']:.0f} MiB |")
    return out


# --- the big one ---------------------------------------------------------------------------
def big(threads: int) -> dict:
    """ResNet-18, 1000 classes, one 3x224x224 image: jacli compute to .h5 (default budget),
    against torch.func.jacrev(chunk_size=100) on the eager module, in another child, each
    with ``threads`` threads."""
    import numpy as np
    import torch
    from real_models import build

    with tempfile.TemporaryDirectory() as tmp:
        net, shape = build("resnet18", size=224, classes=1000)
        x = torch.randn(1, *shape)
        torch.jit.trace(net, x).save(f"{tmp}/r18.pt")
        np.save(f"{tmp}/x.npy", x.numpy())
        rc, mb, seconds = peak([sys.executable, "-m", "jacli", "compute", f"{tmp}/r18.pt", f"{tmp}/x.npy", "-o",
                                f"{tmp}/J.h5", "-q"], env=thread_env(threads))
        code = ("import sys, time, torch; sys.path.insert(0, 'benchmarks'); from real_models import build\n"
                "net, shape = build('resnet18', size=224, classes=1000); x = torch.randn(*shape)\n"
                "t = time.perf_counter(); J = torch.func.jacrev(lambda v: net(v[None])[0], chunk_size=100)(x)\n"
                "jacrev = time.perf_counter() - t; del J; vjps = []\n"
                "for _ in range(4):  # the floor: 1000 x one VJP (the first a warm-up)\n"
                "    t = time.perf_counter(); v = x[None].clone().requires_grad_(True); y = net(v)\n"
                "    torch.autograd.grad(y, v, torch.ones_like(y)); vjps.append(time.perf_counter() - t)\n"
                "print(jacrev, 1000 * min(vjps[1:]), file=sys.stderr)\n")
        r = subprocess.run([sys.executable, "-c", _RSS, sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=ROOT, env=thread_env(threads))
        _, native_mb, _ = r.stdout.split()
        native_s, floor_s = r.stderr.strip().splitlines()[-1].split()  # the jacrev call alone, without torch's import
    out = {"jacli_seconds": seconds, "jacli_peak_mb": mb, "returncode": rc, "jacrev_seconds": float(native_s),
           "jacrev_peak_mb": int(native_mb) / 1024, "floor_seconds": float(floor_s), "threads": threads}
    print(f"  ResNet-18 1000x150528: jacli {seconds:.1f} s at {mb:.0f} MiB; jacrev(chunk_size=100) "
          f"{out['jacrev_seconds']:.1f} s at {out['jacrev_peak_mb']:.0f} MiB; floor {out['floor_seconds']:.1f} s",
          flush=True)
    return out


def big_table(r) -> list[str]:
    return [f"\n### ResNet-18, 1000 classes, one 3×224×224 image (a 602 MB Jacobian), {r['threads']} thread(s)\n",
            "| method | wall time | peak RSS |", "|---|---|---|",
            f"| `jacli compute r18.pt x.npy -o J.h5` | {r['jacli_seconds']:.1f} s | {r['jacli_peak_mb']:.0f} MiB |",
            f"| `torch.func.jacrev(f, chunk_size=100)` (eager, in memory) | {r['jacrev_seconds']:.1f} s | "
            f"{r['jacrev_peak_mb']:.0f} MiB |",
            f"\njacli / jacrev: {r['jacli_seconds'] / r['jacrev_seconds']:.2f}× (jacli's time includes starting Python, "
            f"importing torch, loading the file and writing the .h5); jacli / floor (1000 × one VJP of the eager "
            f"module, {r['floor_seconds']:.1f} s): {r['jacli_seconds'] / r['floor_seconds']:.2f}×"]


if __name__ == "__main__":
    main()
