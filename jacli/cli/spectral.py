import click
import numpy as np

from .. import api
from . import options, plotting
from .common import console, emit_json, load_input, load_model, warn


def _prepare(model_path, fmt, trust_model, input_path, random_n, seed, wrt, of, mode, no_batch, quiet):
    model = load_model(model_path, fmt, trust_model)
    xs = load_input(model, input_path, random_n, seed, quiet)
    return model, api.plan(model, xs, wrt or None, of or None, mode=mode, batch=not no_batch)


def _header(plan, meta: dict, result, output) -> dict:
    return {**{k: meta[k] for k in ("model", "format", "backend", "method", "batch", "dtype")},
            "of": plan.of, "wrt": plan.wrt, "output": output, "jacobians": meta["jacobians"],
            "summary": result.summary(), "samples": result.samples_json()}


@click.command("svd")
@options.model
@options.data
@options.select
@options.svd
@options.spectral_output
@options.engine
@options.method
@options.common
@options.plot
@options.plot_samples
def svd(model_path, fmt, trust_model, input_path, random_n, seed, wrt, of, k, smallest, vectors, solver, tol, output,
        mode, no_batch, chunk_size, max_memory, method, as_json, quiet, debug, plot, plot_samples):
    """Singular values and condition number of each sample's Jacobian at INPUT.

    J is every selected output (flattened) by every selected input (flattened). σ_max is
    the local Lipschitz constant at the sample; σ_max/σ_min the condition number. Small J:
    full SVD (all values). Large J, or -k K with min(m, n) > 512: the top K values (and with
    --smallest the bottom K) by a matrix-free Krylov method on JVP/VJP products, J never
    formed. See docs/spectral.md.
    """
    from ..render.progress import Progress
    from ..render.spectral import svd_view

    plots = plotting.targets(plot)
    model, plan = _prepare(model_path, fmt, trust_model, input_path, random_n, seed, wrt, of, mode, no_batch, quiet)
    with Progress(plan.samples, enabled=not quiet) as progress:
        result = api.svd(model, plan, k=k, smallest=smallest, vectors=vectors, solver=solver, method=method, tol=tol,
                         output=output, chunk_size=chunk_size, max_memory=max_memory, progress=progress)
    for note in plan.notes:  # e.g. reverse mode where forward mode is unavailable
        warn(note, quiet)
    if solver == "auto" and result.solver == "matrix-free" and k is None:
        warn(f"J is {result.m}x{result.n} per sample, too large to decompose in full; computed the top "
             f"{result.singular_values.shape[1]} singular values matrix-free (choose with -k; --smallest for the "
             "condition number)", quiet)
    if result.converged is not None:
        stuck = int((~result.converged & np.isfinite(result.sigma_max)).sum())  # NaN: J held NaN/Inf
        if stuck:
            warn(f"the matrix-free solver did not converge for {stuck} sample(s) within {result.iterations} "
                 "iterations; see error_bounds", quiet)
    if plots:
        from ..render.plots import svd_plot

        plotting.save([svd_plot(result, plot_samples)], plots, quiet)
    meta = api.metadata(model, plan, method)
    doc = {**_header(plan, meta, result, output), "solver": result.solver, "shape": [result.m, result.n],
           "k": k, "tol": tol if result.solver == "matrix-free" else None}
    if result.solver == "matrix-free":
        doc.update(iterations=result.iterations, products=result.products)
    if as_json:
        emit_json(doc)
    elif not quiet:
        console().print(svd_view(doc))
    if output and not as_json:
        _wrote(output, quiet)


@click.command("det")
@options.model
@options.data
@options.select
@options.singular_tol
@options.spectral_output
@options.engine
@options.method
@options.common
@options.plot
def det(model_path, fmt, trust_model, input_path, random_n, seed, wrt, of, singular_tol, output, mode, no_batch,
        chunk_size, max_memory, method, as_json, quiet, debug, plot):
    """sign, log|det J| and det J of each sample's square Jacobian at INPUT, by LU.

    For invertible maps such as normalizing flows (output size = input size). A Jacobian
    that is singular at the model's precision is reported as such (det 0, logabsdet -inf),
    not as a tiny rounding-noise determinant. In --json, non-finite numbers are the strings
    "Infinity", "-Infinity" and "NaN". See docs/spectral.md.
    """
    from ..render.progress import Progress
    from ..render.spectral import det_view

    plots = plotting.targets(plot)
    model, plan = _prepare(model_path, fmt, trust_model, input_path, random_n, seed, wrt, of, mode, no_batch, quiet)
    with Progress(plan.samples, enabled=not quiet) as progress:
        result = api.det(model, plan, method=method, singular_tol=singular_tol, output=output, chunk_size=chunk_size,
                         max_memory=max_memory, progress=progress)
    for note in plan.notes:
        warn(note, quiet)
    if result.overflow.any():
        warn(f"|det J| exceeds the float64 range for {int(result.overflow.sum())} sample(s): det is ±inf there; "
             "logabsdet is exact", quiet)
    if plots:
        from ..render.plots import det_plot

        plotting.save([det_plot(result)], plots, quiet)
    meta = api.metadata(model, plan, method)
    doc = {**_header(plan, meta, result, output), "shape": [result.n, result.n], "singular_tol": result.tol}
    if as_json:
        emit_json(doc)
    elif not quiet:
        console().print(det_view(doc))
    if output and not as_json:
        _wrote(output, quiet)


def _wrote(output: str, quiet: bool) -> None:
    if not quiet:
        click.echo(f"Wrote {output}", err=True)
