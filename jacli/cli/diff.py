import click

from .. import api
from ..errors import InputError
from . import options
from .common import console, emit_json, load_input, load_model


@click.command("diff")
@options.diff
@options.data
@options.select
@options.engine
@options.common
def diff(a_path, b_path, fmt, fmt_b, trust_model, atol, rtol, check_stat, maps, directions, locate, input_path, random_n,
         seed, wrt, of, mode, no_batch, chunk_size, max_memory, as_json, quiet, debug):
    """Compare the derivatives of models A and B at INPUT, or of MODEL with a baseline.

    jacli diff A B INPUT: A and B in any formats. Per (output, input) pair, the outputs and
    the per-sample Jacobians (--no-batch: of the whole arrays) are compared as they stream,
    block by block, in bounded memory; B is the reference. Names are matched by name, else
    by position, else by --map.

    jacli diff MODEL BASELINE.h5: reruns MODEL on the input stored in the baseline (written
    by `jacli compute MODEL INPUT -o BASELINE.h5`) and compares with its Jacobians.

    Models load as on compute: --format (A's; --format-b: B's), --trust-model and
    --custom-objects (for both; imported once). Exit 0 when they agree, 1 when they differ,
    2 on bad input. See docs/guide.md and docs/ci.md.
    """
    from ..engine import diff as d
    from ..io.readers import is_baseline
    from ..render.diff import diff_view
    from ..render.progress import Progress

    baseline = is_baseline(b_path)
    if baseline and fmt_b is not None:
        raise InputError(f"--format-b {fmt_b}: B ({b_path}) is a baseline written by jacli compute -o, not a model, "
                         "so it has no format; drop --format-b (--format gives A's)")
    model_a = load_model(a_path, fmt, trust_model)  # --custom-objects are imported here, once for both
    if baseline:
        if input_path is not None or random_n is not None:
            raise InputError(f"{b_path} is a baseline and brings its own input; drop INPUT/--random "
                             "(or give a model as B)")
        model_b, xs, samples = b_path, None, None
    else:
        model_b = load_model(b_path, fmt_b, trust_model, "--format-b")
        xs = load_input(model_a, input_path, random_n, seed, quiet)
        samples = len(next(iter(xs.values()))) if not no_batch else 1
    tol = [d.parse_named(atol, "--atol", d.tolerance_value), d.parse_named(rtol, "--rtol", d.tolerance_value),
           d.parse_named(check_stat, "--check-stat", d.stat_value)]
    with Progress(samples or 1, enabled=not quiet and samples is not None) as progress:
        result = api.diff(model_a, model_b, xs, wrt or None, of or None, maps=list(maps), atol=tol[0], rtol=tol[1],
                          check_stat=tol[2], batch=False if no_batch else None, mode=mode, directions=directions, seed=seed,
                          locate=locate, chunk_size=chunk_size, max_memory=max_memory, progress=progress)
    side = lambda m: {"model": m.path, "format": m.format, "backend": m.backend}  # noqa: E731
    doc = {"a": side(model_a), "b": {"baseline": b_path} if baseline else side(model_b), **result.to_json()}
    if as_json:
        emit_json(doc)
    elif not quiet:
        console().print(diff_view(doc))
    click.get_current_context().exit(0 if result.passed else 1)
