import click

from .. import api
from .common import console, emit_json


@click.command("ops")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--debug", is_flag=True, hidden=True)
def ops(as_json, debug):
    """List the ONNX operators with derivative rules (VJP, JVP, and w.r.t. which inputs)."""
    rows = api.onnx_ops()
    if as_json:
        emit_json({"operators": rows})
        return
    from ..render.ops import ops_table

    console().print(ops_table(rows))
