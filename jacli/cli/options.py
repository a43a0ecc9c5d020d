"""Each option is defined once here and stacked on the commands that use it."""
from __future__ import annotations

import re

import click

from ..engine.jacobian import DEFAULT_BUDGET
from ..engine.spectral import DEFAULT_TOL


def _stack(*decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def _memory(ctx, param, value):
    if value is None:
        return DEFAULT_BUDGET
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", value, re.I)
    if not m:
        raise click.BadParameter(f"{value!r} is not a size; use e.g. 512M or 2G")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    factor = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    return int(float(m.group(1)) * factor)


model = _stack(
    click.argument("model_path", metavar="MODEL"),
    click.option("--format", "fmt", type=click.Choice(["keras", "savedmodel", "torchscript", "torch-export", "onnx"]),
                 help="Model format (default: detected from the path); torch-export: .pt2 from torch.export.save."),
    click.option("--trust-model", is_flag=True,
                 help="Allow formats that can run code on load (torch.save pickles, Keras Lambda layers, "
                      ".pt2 pickles and code)."),
)

data = _stack(
    click.argument("input_path", metavar="INPUT", required=False),
    click.option("--random", "random_n", type=click.IntRange(min=1), metavar="N",
                 help="Instead of INPUT, draw N samples from N(0,1) shaped by the model's signature."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random."),
)

select = _stack(
    click.option("--wrt", multiple=True, metavar="NAME", help="Input(s) to differentiate with respect to (default: all float inputs)."),
    click.option("--of", "of", multiple=True, metavar="NAME", help="Output(s) to differentiate (default: all float outputs)."),
)

engine = _stack(
    click.option("--mode", type=click.Choice(["auto", "forward", "reverse"]), default="auto", show_default=True,
                 help="Forward mode (one JVP per input column) or reverse mode (one VJP per output row); auto picks the fewer."),
    click.option("--no-batch", is_flag=True,
                 help="Treat each array as one vector (cross-sample derivatives) instead of per-sample Jacobians."),
    click.option("--chunk-size", type=click.IntRange(min=1), metavar="K",
                 help="Jacobian rows (reverse) or columns (forward) per backend call (default: sized to --max-memory)."),
    click.option("--max-memory", callback=_memory, metavar="SIZE",
                 help="Working-memory budget, e.g. 512M, 2G (default: min(2G, a quarter of the available memory)); "
                      "output files are streamed in blocks that fit in it."),
)

method = click.option("--method", type=click.Choice(["ad", "fd"]), default="ad", show_default=True,
                      help="Automatic differentiation, or central finite differences.")
output = click.option("-o", "--output", metavar="OUT", help="Write to OUT (.npy, .npz, .h5) or - for .npy on stdout.")
common = _stack(
    click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout."),
    click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors (and requested data)."),
    click.option("--debug", is_flag=True, help="Show tracebacks."),
)

check = _stack(
    click.option("--fd", is_flag=True, help="Check automatic derivatives against finite differences (required; the only check so far)."),
    click.option("--rtol", type=click.FloatRange(min=0), metavar="R",
                 help="Relative tolerance (default by dtype: 2e-3 float32, 1e-6 float64; at least 1e-2 when FD cannot run in float64)."),
    click.option("--atol", type=click.FloatRange(min=0), metavar="A",
                 help="Absolute tolerance (default: rtol × the largest |entry| of the same output row, plus the AD dtype's resolution)."),
    click.option("--eps", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), metavar="E",
                 help="Relative FD step, h = E·max(|x|, 1) (default: eps^(1/3) of the dtype FD runs in)."),
    click.option("--directions", type=click.IntRange(min=1), metavar="K",
                 help="Check K random directional derivatives per sample (JVP, and VJP by <Jt, c> = <t, Jᵀc>) instead of every entry; "
                      "directions are drawn with --seed."),
    click.option("--mode", "check_mode", type=click.Choice(["auto", "forward", "reverse"]), default="auto", show_default=True,
                 help="The AD checked: forward (JVPs), reverse (VJPs; with --directions, <Jᵀc, t> against FD of <c, f(x+ht)>); "
                      "auto: the fewer passes for every entry, JVP and VJP for --directions, reverse alone where the model "
                      "has no forward mode."),
    click.option("--max-memory", "check_memory", callback=_memory, metavar="SIZE",
                 help="Working-memory budget, e.g. 512M, 2G (default: min(2G, a quarter of the available memory)); "
                      "FD forward calls and JVP/VJP blocks are cut to fit."),
)

# svd / det
spectral_output = click.option("-o", "--output", metavar="OUT",
                               help="Write the per-sample results (and --vectors) to OUT (.npz or .h5), with metadata.")
svd = _stack(
    click.option("-k", "k", type=click.IntRange(min=1), metavar="K",
                 help="Only the top K singular values (matrix-free when J is large)."),
    click.option("--smallest", is_flag=True,
                 help="Also the bottom K: gives the condition number when matrix-free (slower to converge)."),
    click.option("--vectors", is_flag=True,
                 help="Also write the top singular vectors to -o: right ones in each input's shape (the most "
                      "sensitive input directions), left ones in each output's shape."),
    click.option("--solver", type=click.Choice(["auto", "full", "matrix-free"]), default="auto", show_default=True,
                 help="full: form J and decompose it (exact); matrix-free: JVP/VJP products only, J never formed; "
                      "auto: full unless J is large (or -k asks for a few values of a big J)."),
    click.option("--tol", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TOL, show_default=True,
                 help="Relative accuracy asked of matrix-free singular values (certified by residuals)."),
)
singular_tol = click.option("--singular-tol", type=click.FloatRange(min=0), metavar="R",
                            help="J counts as singular when its reciprocal condition number estimate is at most R "
                                 "(default: n·eps of the model's dtype).")
