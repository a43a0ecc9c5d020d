import click

from . import options
from .common import console, emit_json, load_model


@click.command("inspect")
@options.model
@options.common
def inspect_cmd(model_path, fmt, trust_model, as_json, quiet, debug):
    """Show a model's format, backend, inputs and outputs."""
    from ..render.summary import model_table

    model = load_model(model_path, fmt, trust_model)
    info = model.describe()
    if as_json:
        emit_json(info)
    elif not quiet:
        console().print(model_table(info))
