import click

from .. import api
from ..errors import InputError
from . import options, plotting
from .common import console, emit_json, load_input, load_model, warn

SHOW = 10  # mismatches listed in the terminal view


@click.command("check")
@options.model
@options.data
@options.select
@options.check
@options.common
@options.plot
def check(model_path, fmt, trust_model, input_path, random_n, seed, wrt, of, fd, rtol, atol, eps, directions, check_mode,
          check_memory, as_json, quiet, debug, plot):
    """Check MODEL's automatic derivatives against finite differences at INPUT.

    Every entry of every sample's Jacobian (or, with --directions K, K random directional
    derivatives per sample) is compared with Richardson-extrapolated central differences,
    run in float64 where the backend can. Each mismatch is located and diagnosed: a wrong
    gradient, or a place FD cannot judge (a kink: a ReLU/max switch point within the step;
    fd-noise), which is reported but does not fail.
    Models that mix samples along the batch axis are reported as cross-sample leakage.

    Exit 0 when it passes, 1 on a mismatch or leakage, 2 on bad input. See docs/check.md.
    """
    from ..render.progress import Progress

    if not fd:
        raise InputError("say what to check against: --fd (finite differences; the only check so far)")
    plots = plotting.targets(plot)
    model = load_model(model_path, fmt, trust_model)
    xs = load_input(model, input_path, random_n, seed, quiet)
    samples = len(next(iter(xs.values())))
    with Progress(samples, enabled=not quiet) as progress:
        result = api.check(model, xs, wrt or None, of or None, rtol=rtol, atol=atol, eps=eps, directions=directions,
                           seed=seed, max_memory=check_memory, progress=progress, mode=check_mode,
                           notice=lambda text: warn(text, quiet))
    if plots:
        from ..render.plots import check_plot

        plotting.save([check_plot(result)], plots, quiet)
    doc = {"model": model.path, "format": model.format, "backend": model.backend, **result.to_json()}
    if as_json:
        emit_json(doc)
    elif not quiet:
        console().print(_view(doc))
    click.get_current_context().exit(0 if result.passed else 1)


def _view(doc: dict):
    from rich.console import Group
    from rich.text import Text

    verdict = ("PASSED", "bold green") if doc["passed"] else ("FAILED", "bold red")
    parts = [Text.assemble(("Gradient check ", "bold"), verdict, "  ", ("model ", "bold"), doc["model"],
                           f" [{doc['format']}/{doc['backend']}]")]
    for note in doc["notes"]:
        parts.append(Text(f"note: {note}", style="yellow"))
    if doc["leakage"]:
        parts.append(Text(doc["leakage"]["message"], style="red"))
        return Group(*parts)
    what = "every Jacobian entry" + (" (from VJP rows)" if doc["mode"] == "reverse" else "")
    if doc["kind"] == "directions":
        what = (f"{doc['directions']} random directional derivatives per sample"
                + (", <Jᵀc, v> by VJP against FD of <c, f(x+hv)>" if doc["mode"] == "reverse" else ""))
    atol = "per row" if doc["atol"] is None else f"{doc['atol']:g}"
    parts.append(Text(
        f"{what}: AD ({doc['ad_dtype']}) against central differences in {doc['fd_dtype']} (steps h={doc['eps']:.3g}·max(|x|,1) "
        f"and h/2, Richardson); pass when |AD − FD| ≤ atol + rtol·|FD| + err_FD, rtol={doc['rtol']:g}, atol={atol}"))
    parts.append(Text(
        f"{doc['checked']} entries: {doc['failures']} wrong, {doc['kinks']} at kinks, {doc['fd_noise']} in FD noise; "
        f"max |AD − FD| {doc['max_abs_error']:.3g}, max relative {doc['max_rel_error']:.3g}"))
    contracted = doc["kind"] == "directions" and doc["mode"] == "reverse"
    listed = doc["mismatches"][:SHOW] + doc["unresolved"][: max(0, SHOW - len(doc["mismatches"]))]
    if not listed and doc["worst"]:
        listed = [doc["worst"]]
        parts.append(Text("closest to its tolerance:", style="dim"))
    for e in listed:
        parts.append(Text(
            f"  sample {e['sample']}, {_entry(e, contracted)}: AD {e['ad']:.6g}, FD {e['fd']:.6g} (± {e['fd_error']:.2g}); "
            f"|AD − FD| {e['abs_error']:.3g} vs allowed {e['allowed']:.3g}: {e['diagnosis']}",
            style="red" if e["diagnosis"] in ("wrong-gradient", "non-finite") else None))
    if len(doc["mismatches"]) > SHOW:
        parts.append(Text(f"  … the {SHOW} worst shown; --json lists {len(doc['mismatches'])}", style="dim"))
    for a in doc["adjoint_failures"][:SHOW]:
        parts.append(Text(f"sample {a['sample']}, direction v{a['direction']}: <J v, c> = {a['jvp']:.6g} by JVP but "
                          f"<v, Jᵀc> = {a['vjp']:.6g} by VJP (allowed {a['allowed']:.3g}): the JVP and VJP disagree",
                          style="red"))
    if doc["kinks"]:
        parts.append(Text("kink: a ReLU/max switch point at x: the one-sided differences disagree, or the mismatch "
                          "vanished or jumped a step 1e-4 away; not a failure", style="dim"))
    if doc["fd_noise"]:
        parts.append(Text("fd-noise: the FD error estimate alone exceeds the tolerance and the mismatch is of its size; "
                          "not a failure (FD in float64, or a larger --eps, resolves more)", style="dim"))
    return Group(*parts)


def _entry(e: dict, contracted: bool = False) -> str:
    """d{out}[i]/d{in}[j] for a Jacobian entry, d{out}[i]·v{k} for a directional derivative."""
    out = f"d{e['of']}[{','.join(map(str, e['output_index']))}]"
    if contracted:  # reverse-mode directions: <c, J v>
        return f"<c, d{e['of']}·v{e['direction']}>"
    return f"{out}·v{e['direction']}" if e["wrt"] is None else f"{out}/d{e['wrt']}[{','.join(map(str, e['input_index']))}]"
