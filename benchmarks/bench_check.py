"""`jacli check --fd` on the full-size corpus: verdict, time and peak memory per model.

    .venv/bin/python benchmarks/bench_check.py [--models a,b] [--directions K] [--max-memory 1G]
                                                [--samples N] [--formats onnx,trace] [--inspect]

Models: the ONNX project's CNN architectures (tests/corpus_onnx.py: random He-scaled
weights, final Softmax dropped, 3x224x224) and the plain-torch corpus at full size
(tests/corpus_torch.py, ``size="full"``: ResNet-18, MobileNetV3-small, EfficientNet-B0,
DenseNet-121 and ViT-B/16 at 224x224, GPT-2/BERT blocks of 128x768, LSTM/GRU, Conv1d),
the torch ones saved as TorchScript (trace) and ONNX; and Keras applications
(tests/corpus_keras.py: ``k:mobilenet_v3_small``, ``k:resnet50``, ``k:efficientnet_b0``,
weights=None, 224x224x3, logits), saved as ``.keras`` and SavedModel (``model.export``;
``--formats keras`` or ``savedmodel`` for one of them). Each check runs in a fresh
``jacli check MODEL x.npy --fd --directions K --json`` process (inputs N(0, 1), seeded);
the peak RSS is that process's (measured by /usr/bin/time, since Linux hands a
forking process's peak to its child). A correct model must pass: the
table says how many entries were judged wrong, at kinks or in FD noise, in which dtype FD
ran, and how long and how much memory it took. Results also go to
benchmarks/results/check-<time>.json. ``--inspect`` times ``jacli inspect MODEL --json`` instead
(first sight: ``JACLI_CACHE_DIR=off``; then cached, from a fresh cache filled by one run).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

ZOO = ("bvlc_alexnet", "zfnet512", "vgg19", "resnet50", "shufflenet", "squeezenet", "inception_v1", "inception_v2",
       "densenet121")
KERAS = ("k:mobilenet_v3_small", "k:resnet50", "k:efficientnet_b0")
TORCH = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "vit", "gpt2", "bert", "lstm", "gru",
         "conv1d")


def models(names, formats, work: Path):
    """Yield (label, path, input shape) for every requested model, saving each first."""
    import corpus_onnx

    for name in names:
        if name in ZOO and "onnx" in formats and not name.startswith("t:"):
            yield f"{name} (onnx zoo)", corpus_onnx.save(name, work), (3, 224, 224)
    yield from keras_models([n[2:] for n in names if n.startswith("k:")], formats, work)
    torch_names = [n[2:] if n.startswith("t:") else n for n in names
                   if n.startswith("t:") or (n not in ZOO and not n.startswith("k:"))]
    if not torch_names:
        return
    import corpus_torch

    for name in torch_names:
        module, x = corpus_torch.build(name, "full", batch=1)
        paths, failed = corpus_torch.save_all(module, x, work / name, formats=[f for f in formats if f != "zoo"])
        for fmt, path in paths.items():
            yield f"{name} ({fmt})", path, tuple(x.shape[1:])
        for fmt, why in failed.items():
            print(f"{name} ({fmt}): not saved: {why}", file=sys.stderr)


def keras_models(names, formats, work: Path):
    """Keras applications at full size, as .keras and SavedModel (or the one --formats names)."""
    if not names:
        return
    import corpus_keras

    wanted = [f for f in ("keras", "savedmodel") if f in formats] or ["keras", "savedmodel"]
    for name in names:
        model = corpus_keras.application(name, "full")
        for fmt in wanted:
            path = work / (f"{name}.keras" if fmt == "keras" else f"{name}_savedmodel")
            if fmt == "keras":
                model.save(path)
            else:
                model.export(str(path), verbose=False)
            yield f"keras {name} ({fmt})", path, tuple(model.inputs[0].shape[1:])
        del model


def timed(cmd: list[str], work: Path, env: dict | None = None) -> tuple[int, float, int | None]:
    """(exit code, seconds, peak RSS in KB) of ``cmd``; stdout to work/out.json, stderr to work/err.txt."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    # Linux carries the peak RSS of the forking process into its child across exec, so the
    # child is started by /usr/bin/time (a small process) and reports its own peak.
    timer = ["/usr/bin/time", "-f", "%M", "-o", str(work / "rss.txt")] if Path("/usr/bin/time").exists() else []
    start = time.perf_counter()
    with open(work / "out.json", "w") as out, open(work / "err.txt", "w") as err:
        code = subprocess.run(timer + cmd, stdout=out, stderr=err, env=env).returncode
    wall = time.perf_counter() - start
    return code, wall, int((work / "rss.txt").read_text().split()[-1]) if timer else None


def run_inspect(path: Path, work: Path) -> dict:
    cold = timed([sys.executable, "-m", "jacli", "inspect", str(path), "--json"], work, {"JACLI_CACHE_DIR": "off"})
    cache = {"JACLI_CACHE_DIR": str(work / "cache")}
    timed([sys.executable, "-m", "jacli", "inspect", str(path), "--json"], work, cache)
    warm = timed([sys.executable, "-m", "jacli", "inspect", str(path), "--json"], work, cache)
    mb = lambda kb: None if kb is None else round(kb / 1024)  # noqa: E731
    return {"exit": max(cold[0], warm[0]), "first_seconds": round(cold[1], 2), "first_peak_rss_mb": mb(cold[2]),
            "cached_seconds": round(warm[1], 2), "cached_peak_rss_mb": mb(warm[2])}


def run_check(path: Path, shape, args, work: Path) -> dict:
    x = np.random.default_rng(0).standard_normal((args.samples, *shape)).astype(np.float32)
    np.save(work / "x.npy", x)
    cmd = [sys.executable, "-m", "jacli", "check", str(path), str(work / "x.npy"), "--fd", "--json", "--trust-model",
           "--directions", str(args.directions), "--max-memory", args.max_memory]
    code, wall, peak = timed(cmd, work)
    stdout, stderr = (work / "out.json").read_text(), (work / "err.txt").read_text()
    row = {"exit": code, "seconds": round(wall, 1), "peak_rss_mb": None if peak is None else round(peak / 1024)}
    if code in (0, 1) and stdout.strip():
        doc = json.loads(stdout)
        row.update({k: doc[k] for k in ("passed", "checked", "failures", "kinks", "fd_noise", "fd_dtype", "mode")})
        row["worst_ratio"] = round(doc["worst"]["ratio"], 4) if doc["worst"] else None
        row["notes"] = doc["notes"]
    else:
        row["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ZOO), help=f"zoo: {','.join(ZOO)}; torch: {','.join(TORCH)} "
                    f"(t:NAME for the torch one of a shared name); keras: {','.join(KERAS)}")
    ap.add_argument("--formats", default="onnx,trace")
    ap.add_argument("--directions", type=int, default=4)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--max-memory", default="1G")
    ap.add_argument("--inspect", action="store_true", help="time `jacli inspect` (first sight and cached) instead")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.inspect:
            print("| model | first sight (s) | peak RSS (MB) | cached (s) | peak RSS (MB) |")
            print("| --- | --- | --- | --- | --- |")
            for label, path, _ in models(args.models.split(","), args.formats.split(","), work):
                row = {"model": label, "file_mb": round(path.stat().st_size / 2 ** 20), **run_inspect(path, work)}
                rows.append(row)
                print(f"| {label} | {row['first_seconds']} | {row['first_peak_rss_mb']} | {row['cached_seconds']} "
                      f"| {row['cached_peak_rss_mb']} |", flush=True)
        else:
            print("| model | verdict | FD dtype | mode | wrong | kinks | fd-noise | worst ratio | time (s) | peak RSS (MB) |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for label, path, shape in models(args.models.split(","), args.formats.split(","), work):
                row = {"model": label, **run_check(path, shape, args, work)}
                rows.append(row)
                verdict = ("pass" if row.get("passed") else "FAIL") if "passed" in row else f"exit {row['exit']}: {row.get('error')}"
                print(f"| {label} | {verdict} | {row.get('fd_dtype', '')} | {row.get('mode', '')} | {row.get('failures', '')} "
                      f"| {row.get('kinks', '')} | {row.get('fd_noise', '')} | {row.get('worst_ratio', '')} | {row['seconds']} "
                      f"| {row['peak_rss_mb']} |", flush=True)
    kind = "inspect" if args.inspect else "check"
    out = ROOT / "benchmarks" / "results" / f"{kind}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
