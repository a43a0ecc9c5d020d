"""What every command does the same way: load the model, read the input, report."""
from __future__ import annotations

import json
import math
import os
import sys

import click
import numpy as np

from .. import api
from ..errors import InputError, JacliError


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, no_color=bool(os.environ.get("NO_COLOR")) or None)


def warn(message: str, quiet: bool) -> None:
    if not quiet:
        click.echo(f"Warning: {message}", err=True)


def load_model(model_path: str, fmt: str | None, trust_model: bool, format_flag: str = "--format"):
    """With the command's --custom-objects, imported at its first load only (diff loads two
    models); ``format_flag``: the option that gives this model's format (diff's B: --format-b)."""
    context = click.get_current_context(silent=True)
    custom = context.meta.get("jacli.custom_objects", ()) if context is not None else ()
    if custom:
        custom = context.meta["jacli.custom_objects"] = api.import_custom_objects(custom, model_path, fmt)
    try:
        return api.load(model_path, format=fmt, trust=trust_model, custom_objects=custom)
    except JacliError as e:
        if e.option and e.option.startswith("--format "):
            e.option = format_flag + e.option[len("--format"):]
        raise


def load_input(model, input_path: str | None, random_n: int | None, seed: int, quiet: bool) -> dict[str, np.ndarray]:
    from ..io.readers import nonfinite, random_input, read_input

    if input_path is not None and random_n is not None:
        raise InputError("give either INPUT or --random N, not both")
    if input_path is None and random_n is None:
        raise InputError("no input: give an INPUT file (.npy, .npz, .h5, or - for stdin) or --random N")
    xs = random_input(model, random_n, seed) if random_n is not None else read_input(input_path, model)
    for note in nonfinite(xs):
        warn(f"input {note}; the Jacobian there will hold NaN/Inf", quiet)
    return xs


def emit_json(doc: dict) -> None:
    """Strict JSON (RFC 8259, what jq and JSON.parse accept): non-finite numbers become the
    strings "Infinity", "-Infinity" and "NaN", as in every command's documented output."""
    click.echo(json.dumps(_plain(doc), indent=2, allow_nan=False))


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return _plain(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    raise TypeError(f"{type(v).__name__} in a JSON document")


def stdout_is_data(output: str | None) -> bool:
    return output == "-"


def fail_if_json_and_stdout(as_json: bool, output: str | None) -> None:
    if as_json and stdout_is_data(output):
        raise InputError("--json and -o - both want stdout; write the Jacobian to a file instead")


def is_terminal() -> bool:
    return sys.stdout.isatty()
