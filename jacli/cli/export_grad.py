import click

from .. import api
from . import options
from .common import console, emit_json, load_model


@click.command("export-grad")
@options.model
@click.option("-o", "--output", required=True, metavar="OUT.onnx", help="Where to write the derivative graph.")
@click.option("--mode", type=click.Choice(["vjp", "jvp"]), default="vjp", show_default=True,
              help="vjp: inputs + cotangents 'ct:<output>' -> 'grad:<input>'; jvp: inputs + tangents 'tan:<input>' -> 'jvp:<output>'.")
@options.select
@options.common
def export_grad(model_path, fmt, trust_model, output, mode, wrt, of, as_json, quiet, debug):
    """Write an ONNX model's derivative (VJP or JVP) as a standalone ONNX model.

    The result passes onnx.checker and runs in plain onnxruntime, wherever the model runs.
    """
    model = load_model(model_path, fmt, trust_model)
    sig = api.export_grad(model, output, mode=mode, wrt=wrt or None, of=of or None)
    if as_json:
        emit_json({"model": model.path, "format": model.format, "output": output, "mode": mode, **sig})
    elif not quiet:
        c = console()
        c.print(f"Wrote the {mode.upper()} of {model.path} to {output}")
        for kind in ("inputs", "outputs"):
            c.print(f"  {kind}: " + ", ".join(f"{s['name']} {tuple(s['shape'])}" for s in sig[kind]))
