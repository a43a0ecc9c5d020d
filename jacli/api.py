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
from .model import Model, spends_budget


def load(path: str, format: str | None = None, trust: bool = False, custom_objects=()) -> Model:
    """Load a saved model (Keras .keras/.h5, SavedModel dir, TorchScript, ONNX).
    ``trust=True`` allows formats that can run code on load (see docs/security.md).
    ``custom_objects``: Python files or module names to import first, which define a Keras
    model's custom layers (or register torch.export output types); their code runs. Modules
    (``import_custom_objects``'s) are taken as they are."""
    from . import backends

    return backends.load(str(path), fmt=format, trust=trust, custom_objects=custom_objects)


def import_custom_objects(specs, model: str | None = None, format: str | None = None) -> list:
    """Import ``custom_objects`` (Python files or module names; their code runs) once, for
    several ``load`` calls: returns the modules. ``model`` (and its ``format``): the file they
    are for, whose framework is started first, as jacli starts it (TensorFlow's C++ start-up
    lines silenced), should the modules import it."""
    from . import backends

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
    from . import system
    from .backends.onnx import arena

    arena.keep()
    return system.tune_allocator()


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
    from .io.writers import open_writer

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
        from .io.readers import arrays_sha256

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
    from .errors import UnsupportedError

    if model.format not in _NAMED_GRAPHS:
        raise UnsupportedError(f"--locate-probes needs an ONNX model or a torch.export program (their intermediate "
                               f"tensors have names); {model.path} is {model.format}")
    rng = np.random.default_rng(PROBE_SEED)
    tangents = {i: rng.standard_normal(p.xs[i].shape).astype(p.xs[i].dtype) for i in p.wrt}
    order, values, jvps = _probe_intermediates(model, p.xs, tangents)
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
    from .engine import check as chk

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
    from .engine import spectral

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
    from .engine import spectral

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

    from .errors import OutputError
    from .io.writers import open_writer

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
    from .engine import diff as d
    from .engine import mapping as mp

    maps = mp.parse_maps(maps) if isinstance(maps, (list, tuple)) else dict(maps or {})
    tol = d.Tolerances(*(dict(v) if isinstance(v, Mapping) else ({} if v is None else {None: v})
                         for v in (atol, rtol, check_stat)))
    for stat in tol.stat.values():
        d.stat_value(stat)
    d.require_ad(a, "A")
    if isinstance(b, (str, Path)):
        return _diff_baseline(a, str(b), x, wrt, of, maps, tol, batch, mode, directions, locate, chunk_size,
                              max_memory, progress)
    d.require_ad(b, "B")
    batch = True if batch is None else batch
    xs = as_inputs(a, x)
    _check_maps(maps, a)
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
        result.locate = _locate(a, b, pa, links, result, seed)
    return result


def _diff_baseline(a, path, x, wrt, of, maps, tol, batch, mode, directions, locate, chunk_size, max_memory, progress):
    from .engine import diff as d
    from .engine import mapping as mp
    from .io.readers import Baseline

    if x is not None:
        raise InputError("a baseline brings its own input: give MODEL and BASELINE.h5 only")
    if directions:
        raise InputError("--directions compares two models; a baseline holds whole Jacobians: drop --directions")
    with Baseline(path) as base:
        batch = base.batch if batch is None else batch
        if base.batch != batch:
            raise InputError(f"the baseline was computed {'per sample' if base.batch else 'with --no-batch'}; "
                             f"{'drop' if base.batch else 'add'} --no-batch")
        _check_maps(maps, a)
        in_links = mp.match(a.input_names(), base.input_names, maps, "input")
        xs = {}
        for l in in_links:
            v = base.xs[l.b]
            xs[l.a] = mp.permute(v, mp.to_a(l, v.ndim - 1))
        xs = as_inputs(a, xs)
        stored_of = sorted({j["of"] for j in base.jacobians.values()}, key=base.output_names.index)
        stored_wrt = sorted({j["wrt"] for j in base.jacobians.values()}, key=base.input_names.index)
        out_links = mp.match(_names(of) or a.output_names(), base.output_names, maps, "output", a.output_names())
        back_in = {l.b: l.a for l in in_links}
        links = {"inputs": in_links, "outputs": [l for l in out_links if l.b in stored_of]}
        if not links["outputs"]:
            raise InputError(f"none of A's outputs match the baseline's differentiated outputs ({', '.join(stored_of)})")
        pa = jac.plan(a, xs, _names(wrt) or [back_in[n] for n in stored_wrt if n in back_in],
                      [l.a for l in links["outputs"]], mode=mode, batch=batch)
        source = d.BaselineSource(base, pa, links)
        if set(source.ys) >= set(pa.of):
            outputs = d.compare_outputs(pa, source.ys, tol)
        else:
            outputs = []
        dtype = np.result_type(*(base.dtype(k) for k in source.keys.values()))
        jacobians = d.compare_jacobians(a, pa, source, tol, dtype, max_memory, chunk_size, progress)
        result = d.DiffResult(outputs, jacobians, links, "jacobian")
        if not outputs:
            result.notes.append("the baseline stores no outputs; only Jacobians were compared")
        if locate:
            result.locate = _locate_baseline(a, base, pa, links, result)
    return result


def _locate_baseline(a: Model, base, pa: jac.Plan, links: dict, result) -> dict:
    """The first node of ONNX model A whose output's J·v differs from the baseline's probes."""
    from .engine import diff as d

    stored = base.probes()
    if a.format not in _NAMED_GRAPHS:
        return {"available": False, "reason": f"--locate needs an ONNX model or a torch.export program as A (their "
                f"intermediate tensors have names); {a.path} is {a.format}"}
    if stored is None:
        return {"available": False, "reason": "the baseline holds no intermediate derivatives; write it with "
                "jacli compute MODEL.onnx INPUT -o BASELINE.h5 --locate-probes"}
    if any(l.layout for ls in links.values() for l in ls):
        return {"available": False, "reason": "--locate needs the model and the baseline in the same layout"}
    order, tangents, values_b, jvps_b = stored
    to_a = {l.b: l.a for l in links["inputs"]}
    tangents = {to_a[k]: v for k, v in tangents.items() if k in to_a}
    theirs = {t["tensor"]: t for t in order}
    mine, values_a, jvps_a = _probe_intermediates(a, pa.xs, tangents)
    shared = [t for t in mine if t["tensor"] in theirs]
    if not shared:
        return {"available": False, "reason": "the model and the baseline's model have no intermediate tensor names "
                "in common"}
    atol, rtol = (result.jacobians[0].atol, result.jacobians[0].rtol) if result.jacobians else (None, None)
    found = d.first_difference(shared, theirs, values_a, values_b, jvps_a, jvps_b, atol, rtol, pa.dtype)
    return {"available": True, "sample": None, **found}


def _check_maps(maps: Mapping, a: Model) -> None:
    names = set(a.input_names()) | set(a.output_names())
    for name in maps:
        if name not in names:
            raise InputError(f"--map {name}=...: A has no input or output {name!r} "
                             f"(inputs: {', '.join(a.input_names())}; outputs: {', '.join(a.output_names())})")


def _locate(a: Model, b: Model, pa: jac.Plan, links: dict, result, seed: int) -> dict:
    """The first intermediate tensor of A (in its graph's order) whose J·v differs from B's
    tensor of the same name: ONNX models and torch.export programs name their tensors
    (the dynamo ONNX exporter keeps a program's names); else why it is unavailable."""
    from .engine import diff as d
    from .errors import JacliError

    def unavailable(reason: str) -> dict:
        return {"available": False, "reason": reason}

    unnamed = [m for m in (a, b) if m.format not in _NAMED_GRAPHS]
    if unnamed:
        return unavailable(f"--locate compares named intermediate tensors (ONNX models, torch.export programs); "
                           f"{unnamed[0].path} is {unnamed[0].format}, whose intermediate tensors have no such names")
    if any(l.layout for ls in links.values() for l in ls):
        return unavailable("--locate needs both models in the same layout (a --map layout was given)")
    failing = [w for c in result.jacobians if not c.passed for w in c.worst[:1]]
    sample = (failing[0].get("sample") or 0) if failing and pa.batch else 0
    xs = {k: v[sample : sample + 1] for k, v in pa.xs.items()} if pa.batch else pa.xs
    rng = np.random.default_rng(seed)
    tangents = {i: rng.standard_normal(xs[i].shape).astype(xs[i].dtype) for i in pa.wrt}
    to_b = {l.a: l.b for l in links["inputs"]}
    try:
        mine, va, ja = _probe_intermediates(a, xs, tangents)
        order_b, vb, jb = _probe_intermediates(b, {to_b[k]: v for k, v in xs.items()},
                                               {to_b[k]: v for k, v in tangents.items()})
    except JacliError as e:
        return unavailable(f"the intermediate derivatives could not be computed: {e}")
    theirs = {t["tensor"]: t for t in order_b}
    shared = [t for t in mine if t["tensor"] in theirs]
    if not shared:
        return unavailable("the two models have no intermediate tensor names in common")
    atol, rtol = (result.jacobians[0].atol, result.jacobians[0].rtol) if result.jacobians else (None, None)
    found = d.first_difference(shared, theirs, va, vb, ja, jb, atol, rtol, pa.dtype)
    return {"available": True, "sample": sample if pa.batch else None, **found}


_NAMED_GRAPHS = ("onnx", "torch-export")  # formats whose intermediate tensors have names


def _probe_intermediates(model: Model, xs, tangents):
    """(order, values, J·v) of every float intermediate tensor of an ONNX model or a
    torch.export program, for one tangent per differentiated input."""
    if model.format == "onnx":
        from .backends.onnx import locate as onnx_locate

        order = onnx_locate.intermediates(model.proto)
        values, jvps = onnx_locate.probe(model.proto, xs, tangents, order)
        return [{k: t[k] for k in ("tensor", "node", "op_type")} for t in order], values, jvps
    from .backends import torch_locate

    return torch_locate.probe(model, xs, tangents)


def onnx_ops() -> list[dict]:
    """The ONNX operators jacli differentiates, from the rule registry: one dict per operator
    and version range (see ``jacli.backends.onnx.rules.catalog.rows``)."""
    from .backends._common import require

    require("onnx", "onnx", "onnx", "ONNX")
    from .backends.onnx.rules import catalog

    return catalog.rows()
