"""The facade the CLI and Python users call. Plain numpy in and out."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from . import __version__
from .engine import jacobian as jac
from .engine.stats import StatsSink, Summary
from .errors import InputError, OutputError
from .model import Model


def load(path: str, format: str | None = None, trust: bool = False) -> Model:
    """Load a saved model (Keras .keras/.h5, SavedModel dir, TorchScript, ONNX).
    ``trust=True`` allows formats that can run code on load (see docs/security.md)."""
    from . import backends

    return backends.load(str(path), fmt=format, trust=trust)


def as_inputs(model: Model, x) -> dict[str, np.ndarray]:
    """An array (single-input model) or a mapping name -> array, checked against the model."""
    from .io.readers import match_inputs

    arrays = dict(x) if isinstance(x, Mapping) else {"": np.asarray(x)}
    xs = match_inputs(arrays, model)
    if not model.outputs:  # TorchScript: shapes and output names come from a real input
        model.bind(xs)
    return xs


def plan(model: Model, x, wrt=None, of=None, mode: str = "auto", batch: bool = True) -> jac.Plan:
    """``mode="auto"`` picks the mode with fewer passes, and reverse mode where the model has
    no forward mode (then ``plan.notes`` says so)."""
    xs = as_inputs(model, x)
    p = jac.plan(model, xs, _names(wrt), _names(of), mode=mode, batch=batch)
    return jac.reverse_if_no_forward(model, p) if mode == "auto" else p


def jacobian(
    model: Model,
    x,
    wrt: str | Sequence[str] | None = None,
    of: str | Sequence[str] | None = None,
    mode: str = "auto",
    method: str = "ad",
    batch: bool = True,
    chunk_size: int | None = None,
    max_memory: int | None = None,
):
    """The Jacobian of ``model`` at ``x``. Layout: (B, *out, *in) per sample with
    ``batch=True``, (*out, *in) with ``batch=False``. Returns an ndarray when there is one
    (output, input) pair, else a dict keyed ``d{out}/d{in}``. ``max_memory``: bytes of
    working memory (default: min(2 GiB, a quarter of the available memory)); the result
    itself must fit in memory, else use ``compute(..., output="J.h5")``, which streams."""
    p = plan(model, x, wrt, of, mode, batch)
    _check_memory(p.nbytes, "compute it into a file instead: jacli.api.compute(model, plan, output='J.h5')")
    sink = jac.ArraySink(p)
    jac.run(model, p, sink, method=method, chunk=chunk_size, budget=max_memory)
    return next(iter(sink.arrays.values())) if len(sink.arrays) == 1 else sink.arrays


@dataclass
class ComputeResult:
    plan: jac.Plan
    summaries: list[Summary] = field(default_factory=list)
    output: str | None = None


def compute(
    model: Model,
    p: jac.Plan,
    output: str | None = None,
    method: str = "ad",
    chunk_size: int | None = None,
    max_memory: int | None = None,
    progress: Callable[[int], None] | None = None,
    heat: bool = True,
    summaries: bool = True,
) -> ComputeResult:
    """Run a plan, streaming to ``output`` (a path, ``-`` or None) and (unless
    ``summaries=False``) summarising each sample. A file output is written block by block
    in ``max_memory`` bytes of working memory; ``-`` (stdout) is assembled in memory first.
    Refuses, before computing anything, a Jacobian that the disk (or, for ``-``, the
    memory) has no room for."""
    from .io.writers import open_writer

    if method == "ad" and not model.supports_ad:
        raise model._no_ad()
    if output == "-":
        _check_memory(p.nbytes, "write it to a file instead (-o J.h5 streams it in bounded memory)")
    shapes = {q.key: q.shape for q in p.pairs}

    def run(sink) -> None:
        jac.run(model, p, sink, method=method, chunk=chunk_size, budget=max_memory, progress=progress)

    if output is None:
        stats = StatsSink(p.pairs, heat=heat)
        run(stats)
        return ComputeResult(p, stats.ordered())
    pieces = {q.key: (len(q.out_shape), jac.parts_direction(p, method)) for q in p.pairs} if jac.in_parts(p, max_memory) else None
    with open_writer(output, shapes, p.dtype, metadata(model, p, method), batch=p.batch, pieces=pieces) as writer:
        stats = StatsSink(p.pairs, inner=writer, heat=heat) if summaries else None
        run(stats or writer)
    return ComputeResult(p, stats.ordered() if stats else [], output)


def export_grad(model: Model, output: str, mode: str = "vjp", wrt=None, of=None) -> dict:
    """Write an ONNX model's VJP (or JVP) graph as a standalone ONNX model; returns its
    signature (the graph's inputs and outputs)."""
    from .errors import UnsupportedError
    from .io.writers import write_bytes_atomic

    if model.format != "onnx":
        raise UnsupportedError(f"export-grad works on ONNX models; {model.path} is {model.format}")
    if mode not in ("vjp", "jvp"):
        raise InputError(f"--mode must be vjp or jvp, not {mode!r}")
    floats_in = [s.name for s in model.inputs if s.is_float]
    floats_out = [s.name for s in model.outputs if s.is_float]
    wrt, of = _names(wrt) or floats_in, _names(of) or floats_out
    for name, have, flag in [*((n, floats_in, "--wrt") for n in wrt), *((n, floats_out, "--of") for n in of)]:
        if name not in have:
            raise InputError(f"{flag} {name!r}: no floating-point tensor of that name (there are: {', '.join(have)})")
    graph = model.derivative_graph(mode, wrt, of)
    write_bytes_atomic(output, graph.SerializeToString())
    spec = lambda vi: {"name": vi.name, "shape": [d.dim_value or d.dim_param or None for d in vi.type.tensor_type.shape.dim]}  # noqa: E731
    return {"inputs": [spec(v) for v in graph.graph.input], "outputs": [spec(v) for v in graph.graph.output]}


def _check_memory(nbytes: int, instead: str) -> None:
    free = jac.available_memory() if nbytes > jac.BLOCK_BYTES else None  # small results: no need to ask
    if free is not None and nbytes > free:
        raise OutputError(
            f"the Jacobian takes {jac.size_text(nbytes)} but only {jac.size_text(free)} of memory is available; "
            f"{instead}"
        )


def metadata(model: Model, p: jac.Plan, method: str) -> dict:
    """What every output file records about how its numbers were made."""
    return {
        "model": str(model.path),
        "model_sha256": getattr(model, "sha256", None) or sha256(model.path),  # ONNX: digested on load
        "format": model.format,
        "backend": model.backend,
        "inputs": [s.describe() for s in model.inputs],
        "outputs": [s.describe() for s in model.outputs],
        "method": method,
        "mode": p.mode if method == "ad" else "finite-differences",
        "batch": p.batch,
        "samples": p.samples,
        "dtype": str(p.dtype),
        "jacobians": {q.key: {"of": q.of, "wrt": q.wrt, "shape": list(q.shape)} for q in p.pairs},
        "jacli_version": __version__,
    }


def sha256(path: str) -> str:
    """Of a file, or of a directory's files (names and contents, in sorted order)."""
    h = hashlib.sha256()
    root = Path(path)
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
    for f in files:
        if root.is_dir():
            h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _names(v) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return [v]
    names = list(v)
    if not all(isinstance(n, str) for n in names):
        raise InputError("wrt/of take input/output names")
    return names


def check(
    model: Model,
    x,
    wrt: str | Sequence[str] | None = None,
    of: str | Sequence[str] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    eps: float | None = None,
    directions: int | None = None,
    seed: int = 0,
    max_memory: int = jac.DEFAULT_BUDGET,
    progress: Callable[[int], None] | None = None,
    mode: str = "auto",
):
    """Check the model's automatic derivatives against finite differences at ``x``, per
    sample: every Jacobian entry, or ``directions`` random directional derivatives per
    sample. Tolerances default by dtype. ``mode``: the AD the check exercises — forward
    (JVPs), reverse (VJPs) or auto (the fewer passes for every entry, JVP and VJP for
    directions; reverse alone where the model has no forward mode). Returns a
    ``jacli.engine.check.CheckResult`` (``.passed``, ``.worst``, ``.to_json()``); see docs/check.md."""
    from .engine import check as chk

    if mode not in ("auto", "forward", "reverse"):
        raise InputError(f"--mode must be auto, forward or reverse, not {mode!r}")
    p = jac.plan(model, as_inputs(model, x), _names(wrt), _names(of), mode=mode, batch=True)
    return chk.check(model, p, rtol=rtol, atol=atol, eps=eps, directions=directions, seed=seed, budget=max_memory,
                     progress=progress, mode=mode)


# --- spectra: singular values, condition numbers, determinants -------------------------
def svd(
    model: Model,
    x,
    k: int | None = None,
    smallest: bool = False,
    vectors: bool = False,
    wrt: str | Sequence[str] | None = None,
    of: str | Sequence[str] | None = None,
    batch: bool = True,
    solver: str = "auto",
    method: str = "ad",
    tol: float | None = None,
    output: str | None = None,
    chunk_size: int | None = None,
    max_memory: int | None = None,
    progress: Callable[[int], None] | None = None,
):
    """Singular values (largest first) and condition number of each sample's Jacobian
    (all selected outputs by all selected inputs, flattened). ``x``: an input, or a plan
    from ``plan()``. ``k``: only the top k (and with ``smallest`` the bottom k);
    ``solver``: auto | full | matrix-free (J never formed); ``vectors``: write the top
    singular vectors to ``output`` (.npz/.h5). Returns a ``jacli.engine.spectral.SvdResult``."""
    from .engine import spectral

    p = x if isinstance(x, jac.Plan) else plan(model, x, wrt, of, batch=batch)
    tol = spectral.DEFAULT_TOL if tol is None else tol
    chosen = spectral.choose_solver(model, p, k, solver, method, max_memory)
    if vectors and output is None:
        raise InputError("singular vectors go to a file: give -o OUT.npz or OUT.h5 with --vectors")
    meta = {**metadata(model, p, method), "command": "svd", "solver": chosen, "k": k, "smallest": smallest, "tol": tol}
    with _spectral_writer(output, spectral.svd_arrays(p, chosen, k, smallest, vectors), meta) as sink:
        return spectral.svd(model, p, k, smallest, vectors, chosen, method, tol, max_memory, chunk_size, sink, progress)


def det(
    model: Model,
    x,
    wrt: str | Sequence[str] | None = None,
    of: str | Sequence[str] | None = None,
    batch: bool = True,
    method: str = "ad",
    singular_tol: float | None = None,
    output: str | None = None,
    chunk_size: int | None = None,
    max_memory: int | None = None,
    progress: Callable[[int], None] | None = None,
):
    """sign, log|det J| and det J of each sample's square Jacobian, by LU; a Jacobian whose
    reciprocal condition estimate is at most ``singular_tol`` (default n·eps of the model's
    dtype) is reported singular. Returns a ``jacli.engine.spectral.DetResult``."""
    from .engine import spectral

    p = x if isinstance(x, jac.Plan) else plan(model, x, wrt, of, batch=batch)
    if singular_tol is None:
        singular_tol = spectral.default_singular_tol(p)
    meta = {**metadata(model, p, method), "command": "det", "singular_tol": singular_tol}
    with _spectral_writer(output, spectral.det_arrays(p), meta) as sink:
        return spectral.det(model, p, method, singular_tol, max_memory, chunk_size, sink, progress)


def _spectral_writer(output: str | None, arrays: dict, meta: dict):
    """An atomic .npz/.h5 writer for the named float64 arrays (each with a leading sample
    axis, of length 1 with ``batch=False``), or nothing without ``output``."""
    import contextlib

    from .errors import OutputError
    from .io.writers import open_writer

    if output is None:
        return contextlib.nullcontext(None)
    if output == "-" or Path(output).suffix.lower() not in (".npz", ".h5", ".hdf5"):
        raise OutputError(f"cannot write {output}: svd and det write several arrays; use a .npz or .h5 file")
    return open_writer(output, arrays, np.float64, meta, batch=True)
