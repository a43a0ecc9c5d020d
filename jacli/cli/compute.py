import click

from .. import api
from . import options, plotting
from .common import console, emit_json, fail_if_json_and_stdout, load_input, load_model, warn


@click.command("compute")
@options.model
@options.data
@options.output
@options.select
@options.engine
@options.method
@options.common
@options.plot
@options.plot_samples
@options.plot_map
@options.locate_probes
def compute(model_path, fmt, trust_model, input_path, random_n, seed, output, wrt, of, mode, no_batch, chunk_size,
            max_memory, method, as_json, quiet, debug, plot, plot_samples, plot_output, plot_layout, plot_reduce,
            locate_probes):
    """Compute the Jacobian d(outputs)/d(inputs) of MODEL at INPUT.

    Per-sample Jacobians of a batch, shape (B, *output, *input), unless --no-batch.
    Without -o, prints a summary per sample; with -o, writes .npy/.npz/.h5 (or - for stdout).
    """
    from ..render.progress import Progress

    fail_if_json_and_stdout(as_json, output)
    plots = plotting.targets(plot)
    model = load_model(model_path, fmt, trust_model)
    xs = load_input(model, input_path, random_n, seed, quiet)
    plan = api.plan(model, xs, wrt or None, of or None, mode=mode, batch=not no_batch)
    shown = not (as_json or quiet or output == "-")  # the terminal view, with its heatmap
    sink = None
    if plots:
        sink = plotting.jacobian_sink(model, plan, plot_samples, plot_output, plot_layout, plot_reduce, quiet)
    with Progress(plan.samples, enabled=not quiet) as progress:
        result = api.compute(model, plan, output, method=method, chunk_size=chunk_size, max_memory=max_memory,
                             progress=progress, heat=shown, summaries=shown or as_json, tap=sink.wrap if sink else None,
                             probes=locate_probes)
    if sink:
        plotting.save(plotting.compute_plots(sink, plan, plot_reduce), plots, quiet)
    for note in result.plan.notes:  # e.g. reverse mode where forward mode is unavailable
        warn(note, quiet)
    if not (as_json or shown):
        return
    meta = api.metadata(model, result.plan, method)  # the mode that ran
    if as_json:
        emit_json({**{k: meta[k] for k in ("model", "format", "backend", "method", "mode", "batch", "dtype")},
                   "output": output, "jacobians": meta["jacobians"],
                   "samples": [s.to_json() for s in result.summaries]})
    else:
        from ..render.summary import compute_view

        console().print(compute_view(result.summaries, meta))
        if output:
            click.echo(f"Wrote {', '.join(meta['jacobians'])} to {output}", err=True)
