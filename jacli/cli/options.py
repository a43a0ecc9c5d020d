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
    size = int(float(m.group(1)) * factor)
    if size < 1 << 20:
        raise click.BadParameter(f"{value!r} is less than 1 MiB, too little to work in; use e.g. 64M")
    return size


def _format(flag: str, name: str, what: str):
    return click.option(flag, name, type=click.Choice(["keras", "savedmodel", "torchscript", "torch-export", "onnx"]),
                        help=f"{what} (default: detected from the path); torch-export: .pt2 from torch.export.save.")


custom_objects = click.option(
    "--custom-objects", "custom_objects", multiple=True, metavar="MODULE", expose_value=False,
    callback=lambda ctx, param, value: ctx.meta.__setitem__("jacli.custom_objects", value),
    help="Import MODULE (a .py file or a module name) before loading: it defines the model's custom Keras layers, "
         "or registers its torch.export output types. Runs that code: only for code you trust, like --trust-model.")

model = _stack(
    click.argument("model_path", metavar="MODEL"),
    _format("--format", "fmt", "Model format"),
    click.option("--trust-model", is_flag=True,
                 help="Allow formats that can run code on load (torch.save pickles, Keras Lambda layers, "
                      ".pt2 pickles and code)."),
    custom_objects,
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
                 help="Forward mode (one JVP per input column) or reverse mode (one VJP per output row); auto picks the fewer "
                      "(within 2x of each other: the one measured faster on earlier calls)."),
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
                            help="J counts as singular when σ_min/σ_max is at most R (default: where svd finds J "
                                 "rank deficient, σ_min ≤ 4·eps·‖J‖_F at the model's precision).")


# --plot (the optional extra jacli[plot]); see docs/plots.md
def _plot_output(ctx, param, value):
    if value is None:
        return ("top", 1)
    m = re.fullmatch(r"\s*top-?(\d+)\s*", value, re.I)
    if m and int(m.group(1)) >= 1:
        return ("top", int(m.group(1)))
    if re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", value):
        return ("index", tuple(int(i) for i in value.split(",")))
    raise click.BadParameter(f"{value!r}: give an output index (flat, or i,j,… per axis) or top-K, e.g. top-3")


def _plot_layouts(ctx, param, values):
    if not values:
        return {}
    from ..render.plot_sink import LAYOUTS

    out = {}
    for value in values:
        name, _, layout = value.rpartition(":")
        if layout not in LAYOUTS:
            raise click.BadParameter(f"{value!r}: give [INPUT:]LAYOUT with LAYOUT one of {', '.join(LAYOUTS)}")
        out[name] = layout
    return out


plot = click.option("--plot", "plot", multiple=True, metavar="FILE",
                    help="Draw the result to FILE (.png or .svg; repeatable), or to an existing directory (one PNG per "
                         "plot). Needs the extra jacli[plot] (matplotlib). See docs/plots.md.")
plot_samples = click.option("--plot-samples", type=click.IntRange(min=1), default=3, show_default=True, metavar="N",
                            help="Samples drawn by --plot (the first N).")
plot_map = _stack(
    click.option("--plot-output", callback=_plot_output, metavar="INDEX|top-K",
                 help="Outputs whose saliency maps --plot draws for image inputs: an index into the output, or the "
                      "K largest outputs of each sample (default: top-1)."),
    click.option("--plot-layout", multiple=True, callback=_plot_layouts, metavar="[INPUT:]LAYOUT",
                 help="How --plot reads an input: chw, hwc, hw (images), seq (time × features), flat, or auto "
                      "(default: images from 3-D shapes with 1, 3 or 4 channels, sequences from 2-D ones)."),
    click.option("--plot-reduce", type=click.Choice(["max", "l2"]), default="max", show_default=True,
                 help="Saliency maps: |dy/dx| reduced over an image's channels by max or L2 norm."),
)


# diff
diff = _stack(
    click.argument("a_path", metavar="A"),
    click.argument("b_path", metavar="B"),
    _format("--format", "fmt", "Format of A (of MODEL, against a baseline)"),
    _format("--format-b", "fmt_b", "Format of B, a model (a baseline has none)"),
    click.option("--trust-model", is_flag=True,
                 help="Allow formats that can run code on load (for both models; see docs/security.md)."),
    custom_objects,
    click.option("--atol", multiple=True, metavar="[NAME:]A",
                 help="Absolute tolerance, for every output or (NAME:A, repeatable) for output NAME and its "
                      "Jacobians, or one Jacobian dNAME/dIN (default by dtype: 1e-5 float32, 1e-9 float64, 1e-3 float16)."),
    click.option("--rtol", multiple=True, metavar="[NAME:]R",
                 help="Relative tolerance |a-b|/|b| (B is the reference), like --atol (default: 1e-4 float32, "
                      "1e-7 float64, 1e-2 float16). An entry differs when both are exceeded."),
    click.option("--check-stat", multiple=True, metavar="[NAME:]STAT",
                 help="What is compared with the tolerances: elementwise (every entry; default), or the max, mean "
                      "or median of the errors (passes when the absolute or the relative one is within tolerance)."),
    click.option("--map", "maps", multiple=True, metavar="A=B[:LAYOUT]",
                 help="Pair A's input/output A with B's B (repeatable; default: by name, else by position). "
                      "LAYOUT nhwc: B holds it channels-last where A is channels-first; nchw: the reverse."),
    click.option("--directions", type=click.IntRange(min=1), metavar="K",
                 help="Compare only J·v and Jᵀc for K random probes per sample (for Jacobians too big to form); "
                      "the miss probability is reported."),
    click.option("--locate", is_flag=True,
                 help="Name the first intermediate tensor whose derivative differs, and its node (ONNX models, "
                      "torch.export programs, baselines written with compute --locate-probes)."),
)
locate_probes = click.option(
    "--locate-probes", is_flag=True,
    help="With -o FILE.h5 for an ONNX model or torch.export program: also store J·v of every intermediate tensor "
         "for one random tangent, so that `jacli diff MODEL FILE.h5 --locate` can name the node where a later model "
         "departs.")
