"""The facade the CLI and Python users call. Plain numpy in and out (diff's baseline and
--locate comparisons in ``jacli.api.parity``)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .. import __version__
from ..engine import jacobian as jac
from ..engine.stats import StatsSink, Summary
from ..errors import InputError, OutputError
from ..model import Model, spends_budget


def load(path: str, format: str | None = None, trust: bool = False, custom_objects=()) -> Model:
    """Load a saved model (Keras .keras/.h5, SavedModel dir, TorchScript, ONNX).
    ``trust=True`` allows formats that can run code on load (see docs/security.md).
    ``custom_objects``: Python files or module names to import first, which define a Keras
    model's custom layers (or register torch.export output types); their code runs. Modules
    (``import_custom_objects``'s) are taken as they are."""
    from .. import backends

    return backends.load(str(path), fmt=format, trust=trust, custom_objects=custom_objects)


def import_custom_objects(specs, model: str | None = None, format: str | None = None) -> list:
    """Import ``custom_objects`` (Python files or module names; their code runs) once, for
    several ``load`` calls: returns the modules. ``model`` (and its ``format``): the file they
    are for, whose framework is started first, as jacli starts it (TensorFlow's C++ start-up
    lines silenced), should the modules import it."""
    from .. import backends

    if model is not None:
        backends.framework_first(str(model), format)
    return backends.import_modules(specs)


def tune_allocator() -> dict[str, int]:
    """Make this process's C allocator (glibc) keep freed memory for reuse instead of
    page-faulting it in again on every call: blocks below 32 MiB come from the heap, up to
    256 MiB of free heap is kept. The ``jacli`` command does this in its own process (torch
    runs of many calls up to 1.2x faster); the Python API leaves the caller's process alone
    unless asked. Returns the settings made (none without glibc, with ``JACLI_MALLOC=off``,
    or where ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` are set). The ONNX
    sessions' arena (``backends.onnx.arena``) then keeps its memory until the process
    ends instead of releasing it as the last ONNX model goes."""
    from .. import system
    from ..backends.onnx import arena

    arena.keep()
    return system.tune_allocator()


def as_inputs(model: Model, x) -> dict[str, np.ndarray]:
    """An array (single-input model) or a mapping name -> array, checked against the model."""
    from ..io.readers import match_inputs

    arrays = dict(x) if isinstance(x, Mapping) else {"": np.asarray(x)}
    xs = match_inputs(arrays, model)
    if not model.outputs:  # TorchScript: shapes and output names come from a real input
        model.bind(xs)
    return xs


def plan(model: Model, x, wrt=None, of=None, mode: str = "auto", batch: bool = True) -> jac.Plan:
    """``mode="auto"`` picks the mode with fewer passes, and reverse mode where the model has
    no forward mode (then ``plan.notes`` says so); where rows and columns are within 2x of
    each other, the mode measured faster on the model's earlier Jacobians of these shapes
    (unless ``JACLI_STRATEGY`` is set; see docs/performance.md)."""
    xs = as_inputs(model, x)
    p = jac.plan(model, xs, _names(wrt), _names(of), mode=mode, batch=batch, tune=True)
    return jac.reverse_if_no_forward(model, p) if mode == "auto" else p


@spends_budget(jac.DEFAULT_BUDGET)
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
    plan: jac.Plan  # the plan that ran: its mode produced the numbers (``jacobian.run``)
    summaries: list[Summary] = field(default_factory=list)
    output: str | None = None


@spends_budget(jac.DEFAULT_BUDGET)
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
    tap: Callable | None = None,
    probes: bool = False,
) -> ComputeResult:
    """Run a plan, streaming to ``output`` (a path, ``-`` or None) and (unless
    ``summaries=False``) summarising each sample. A file output is written block by block
    in ``max_memory`` bytes of working memory; ``-`` (stdout) is assembled in memory first.
    Refuses, before computing anything, a Jacobian that the disk (or, for ``-``, the
    memory) has no room for. ``tap(sink)``, if given, returns a sink that sees every block
    before passing it on to ``sink`` (``render.plot_sink.PlotSink.wrap`` does). A ``.h5`` output also
    stores the input and outputs (a baseline for ``diff``), and with ``probes`` (ONNX models) the J·v
    of every intermediate tensor for one random tangent, for ``diff(..., locate=True)``."""
    from ..io.writers import open_writer

    if method == "ad" and not model.supports_ad:
        raise model._no_ad()
    if output == "-":
        _check_memory(p.nbytes, "write it to a file instead (-o J.h5 streams it in bounded memory)")
    shapes = {q.key: q.shape for q in p.pairs}

    def run(sink) -> jac.Plan:
        return jac.run(model, p, tap(sink) if tap else sink, method=method, chunk=chunk_size, budget=max_memory,
                       progress=progress)

    if output is None:
        stats = StatsSink(p.pairs, heat=heat)
        return ComputeResult(run(stats), stats.ordered())
    pieces = {q.key: (len(q.out_shape), jac.parts_direction(p, method)) for q in p.pairs} if jac.in_parts(p, max_memory) else None
    meta = metadata(model, p, method)
    baseline = output != "-" and Path(output).suffix.lower() in (".h5", ".hdf5")  # with its input: a baseline
    if baseline:
        from ..io.readers import arrays_sha256

        meta["input_sha256"] = arrays_sha256(p.xs)
    if probes and not baseline:
        raise InputError("--locate-probes stores intermediate derivatives in a baseline: give -o FILE.h5")
    found = _locate_probes(model, p) if probes else None
    if found:
        meta["locate_probes"] = found[0]
    with open_writer(output, shapes, p.dtype, meta, batch=p.batch, pieces=pieces) as writer:
        if baseline:
            writer.store_arrays("jacli_input", p.xs)
            writer.store_arrays("jacli_output", p.ys)
        if found:
            for group, arrays in found[1].items():
                writer.store_arrays(group, arrays)
        stats = StatsSink(p.pairs, inner=writer, heat=heat) if summaries else None
        ran = run(stats or writer)
        writer.note(mode=_mode(ran.mode, method))  # a mode on trial that failed was replaced
    return ComputeResult(ran, stats.ordered() if stats else [], output)


PROBE_SEED = 0  # the baseline's locate tangent
PROBE_BYTES = 256 << 20  # at most this much of intermediate values and derivatives in a baseline


def _locate_probes(model: Model, p: jac.Plan):
    """(order, {group: arrays}): values and J·v of every float intermediate tensor of an ONNX
    model or torch.export program at the plan's input, for one seeded Gaussian tangent on
    the differentiated inputs."""
    from ..errors import UnsupportedError
    from . import parity

    if model.format not in parity.NAMED_GRAPHS:
        raise UnsupportedError(f"--locate-probes needs an ONNX model or a torch.export program (their intermediate "
                               f"tensors have names); {model.path} is {model.format}")
    rng = np.random.default_rng(PROBE_SEED)
    tangents = {i: rng.standard_normal(p.xs[i].shape).astype(p.xs[i].dtype) for i in p.wrt}
    order, values, jvps = parity.probe_intermediates(model, p.xs, tangents)
    size = sum(v.nbytes for v in values.values()) + sum(v.nbytes for v in jvps.values())
    if size > PROBE_BYTES:
        raise OutputError(f"--locate-probes would store {jac.size_text(size)} of intermediate tensors (more than "
                          f"{jac.size_text(PROBE_BYTES)}); use fewer samples")
    groups = {"jacli_locate/tangent": tangents}
    for j, t in enumerate(order):  # by position: tensor names may hold "/"
        groups[f"jacli_locate/t{j}"] = {"value": values[t["tensor"]], "jvp": jvps[t["tensor"]]}
    return order, groups


def export_grad(model: Model, output: str, mode: str = "vjp", wrt=None, of=None) -> dict:
    """Write an ONNX model's VJP (or JVP) graph as a standalone ONNX model; returns its
    signature (the graph's inputs and outputs)."""
    from ..errors import UnsupportedError
    from ..io.writers import write_bytes_atomic

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
        "mode": _mode(p.mode, method),
        "batch": p.batch,
        "samples": p.samples,
        "dtype": str(p.dtype),
        "jacobians": {q.key: {"of": q.of, "wrt": q.wrt, "shape": list(q.shape)} for q in p.pairs},
        "jacli_version": __version__,
    }


def _mode(mode: str, method: str) -> str:
    return mode if method == "ad" else "finite-differences"


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


@spends_budget(jac.DEFAULT_BUDGET)
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
    notice: Callable[[str], None] | None = None,
):
    """Check the model's automatic derivatives against finite differences at ``x``, per
    sample: every Jacobian entry, or ``directions`` random directional derivatives per
    sample. Tolerances default by dtype. ``mode``: the AD the check exercises — forward
    (JVPs), reverse (VJPs) or auto (the fewer passes for every entry, JVP and VJP for
    directions; reverse alone where the model has no forward mode). Returns a
    ``jacli.engine.check.CheckResult`` (``.passed``, ``.worst``, ``.to_json()``); see docs/check.md.
    ``notice(text)`` hears, before the work, that checking every entry will take long."""
    from ..engine import check as chk

    if mode not in ("auto", "forward", "reverse"):
        raise InputError(f"--mode must be auto, forward or reverse, not {mode!r}")
    p = jac.plan(model, as_inputs(model, x), _names(wrt), _names(of), mode=mode, batch=True)
    return chk.check(model, p, rtol=rtol, atol=atol, eps=eps, directions=directions, seed=seed, budget=max_memory,
                     progress=progress, mode=mode, notice=notice)


# --- spectra: singular values, condition numbers, determinants -------------------------
@spends_budget(jac.DEFAULT_BUDGET)
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
    from ..engine import spectral

    p = x if isinstance(x, jac.Plan) else plan(model, x, wrt, of, batch=batch)
    tol = spectral.DEFAULT_TOL if tol is None else tol
    chosen = spectral.choose_solver(model, p, k, solver, method, max_memory)
    if vectors and output is None:
        raise InputError("singular vectors go to a file: give -o OUT.npz or OUT.h5 with --vectors")
    meta = {**metadata(model, p, method), "command": "svd", "solver": chosen, "k": k, "smallest": smallest, "tol": tol}
    with _spectral_writer(output, spectral.svd_arrays(p, chosen, k, smallest, vectors), meta) as sink:
        result = spectral.svd(model, p, k, smallest, vectors, chosen, method, tol, max_memory, chunk_size, sink, progress)
        if sink is not None and result.mode:  # the full solver's J, in the mode that ran
            sink.note(mode=_mode(result.mode, method))
    return result


@spends_budget(jac.DEFAULT_BUDGET)
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
    """sign, log|det J| (with an error estimate) and det J of each sample's square Jacobian;
    a Jacobian that ``svd`` finds rank deficient (or, given ``singular_tol``, whose
    σ_min/σ_max is at most that) is reported singular. Returns a
    ``jacli.engine.spectral.DetResult``."""
    from ..engine import spectral

    p = x if isinstance(x, jac.Plan) else plan(model, x, wrt, of, batch=batch)
    meta = {**metadata(model, p, method), "command": "det", "singular_rule": spectral.singular_rule(p, singular_tol)}
    with _spectral_writer(output, spectral.det_arrays(p), meta) as sink:
        result = spectral.det(model, p, method, singular_tol, max_memory, chunk_size, sink, progress)
        if sink is not None:
            sink.note(mode=_mode(result.mode, method))
    return result


def _spectral_writer(output: str | None, arrays: dict, meta: dict):
    """An atomic .npz/.h5 writer for the named float64 arrays (each with a leading sample
    axis, of length 1 with ``batch=False``), or nothing without ``output``."""
    import contextlib

    from ..errors import OutputError
    from ..io.writers import open_writer

    if output is None:
        return contextlib.nullcontext(None)
    if output == "-" or Path(output).suffix.lower() not in (".npz", ".h5", ".hdf5"):
        raise OutputError(f"cannot write {output}: svd and det write several arrays; use a .npz or .h5 file")
    return open_writer(output, arrays, np.float64, meta, batch=True)


# --- diff: derivative parity of two models, or of a model and a baseline file --------------
@spends_budget(jac.DEFAULT_BUDGET)
def diff(
    a: Model,
    b: Model | str,
    x=None,
    wrt: str | Sequence[str] | None = None,
    of: str | Sequence[str] | None = None,
    maps: Mapping[str, tuple[str, str | None]] | Sequence[str] | None = None,
    atol: float | Mapping[str | None, float] | None = None,
    rtol: float | Mapping[str | None, float] | None = None,
    check_stat: str | Mapping[str | None, str] | None = None,
    batch: bool | None = None,
    mode: str = "auto",
    directions: int | None = None,
    seed: int = 0,
    locate: bool = False,
    chunk_size: int | None = None,
    max_memory: int | None = None,
    progress: Callable[[int], None] | None = None,
):
    """Compare model ``a`` with model ``b`` at ``x`` (or with a baseline file ``b``, a path
    written by ``compute(..., output='base.h5')``, at the baseline's own input): outputs and
    per-sample Jacobians (``batch=False``: of whole arrays; None: per sample, or as the
    baseline was computed), streamed block by block in
    ``max_memory``; with ``directions`` K, only J·v and Jᵀc for K random probes per sample.
    ``maps``: {A name: (B name, layout None | 'nhwc' | 'nchw')} or ``["a=b:nhwc", ...]``;
    tolerances: a number or {name or None: value}. Returns a ``jacli.engine.diff.DiffResult``
    (``.passed``, ``.to_json()``); see docs/guide.md#diff."""
    from ..engine import diff as d
    from ..engine import mapping as mp
    from . import parity

    maps = mp.parse_maps(maps) if isinstance(maps, (list, tuple)) else dict(maps or {})
    tol = d.Tolerances(*(dict(v) if isinstance(v, Mapping) else ({} if v is None else {None: v})
                         for v in (atol, rtol, check_stat)))
    for stat in tol.stat.values():
        d.stat_value(stat)
    d.require_ad(a, "A")
    if isinstance(b, (str, Path)):
        return parity.baseline(a, str(b), x, wrt, of, maps, tol, batch, mode, directions, locate, chunk_size,
                              max_memory, progress)
    d.require_ad(b, "B")
    batch = True if batch is None else batch
    xs = as_inputs(a, x)
    parity.check_maps(maps, a)
    in_links = mp.match(a.input_names(), b.input_names(), maps, "input")
    unfed = [n for n in b.input_names() if n not in {l.b for l in in_links}]
    if unfed:
        raise InputError(f"B's input(s) {', '.join(unfed)} have no counterpart in A; pair them with --map A_NAME=B_NAME")
    mp.check_inputs(xs, in_links, b)
    if not b.outputs:  # TorchScript: B learns its outputs from a real input
        b.bind(mp.Mapped(b, in_links, []).b_inputs(xs, 0))
    out_links = mp.match(_names(of) or a.output_names(), b.output_names(), maps, "output", a.output_names())
    links = {"inputs": in_links, "outputs": out_links}
    view = mp.Mapped(b, in_links, out_links)
    pa = jac.plan(a, xs, _names(wrt), _names(of) or [l.a for l in out_links if a.spec(l.a).is_float] or None,
                  mode=mode, batch=batch)
    pb = jac.plan(view, xs, pa.wrt, pa.of, mode=pa.mode, batch=batch)
    mp.check_shapes(pa, {q.key: (q.out_shape, q.in_shape) for q in pb.pairs}, links)
    outputs = d.compare_outputs(pa, pb.ys, tol)
    if directions:
        jacobians = d.compare_directions(a, pa, view, tol, directions, seed, max_memory, progress)
        result = d.DiffResult(outputs, jacobians, links, "directions", directions, d.miss_probability(directions))
    else:
        source = d.ModelSource(view, pb, (max_memory or jac.DEFAULT_BUDGET) // 2, chunk_size)
        jacobians = d.compare_jacobians(a, pa, source, tol, pb.dtype, max_memory, chunk_size, progress)
        result = d.DiffResult(outputs, jacobians, links, "jacobian")
    if locate:
        result.locate = parity.locate(a, b, pa, links, result, seed)
    return result


def onnx_ops() -> list[dict]:
    """The ONNX operators jacli differentiates, from the rule registry: one dict per operator
    and version range (see ``jacli.backends.onnx.rules.catalog.rows``)."""
    from ..backends._common import require

    require("onnx", "onnx", "onnx", "ONNX")
    from ..backends.onnx.rules import catalog

    return catalog.rows()
