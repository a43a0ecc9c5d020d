"""``--plot``: where the pictures go (checked before any work starts), and writing them."""
from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import OutputError
from .common import warn


def targets(paths) -> list[Path]:
    """The --plot values as paths: .png/.svg files in existing writable directories, or
    existing directories (one PNG per plot). Raises before anything is computed; also when
    matplotlib (the extra jacli[plot]) is missing."""
    if not paths:
        return []
    from ..render import plots

    plots.require()
    out = []
    for value in paths:
        path = Path(value)
        folder = path if path.is_dir() else path.parent
        if not path.is_dir() and path.suffix.lower() not in plots.FORMATS:
            raise OutputError(f"cannot write plot {value}: give a .png or .svg file, or an existing directory "
                              "(one PNG per plot)")
        if not folder.is_dir():
            why = "is not a directory" if folder.exists() else "does not exist"
            raise OutputError(f"cannot write plot {value}: {folder} {why}")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write plot {value}: directory {folder} is not writable")
        out.append(path)
    return out


def jacobian_sink(model, plan, samples: int, output, layouts: dict, reduce: str, quiet: bool):
    from ..render.plot_sink import PlotSink

    sink = PlotSink(plan, samples, output, layouts, reduce, channels_last=model.format in ("keras", "savedmodel"))
    if sink.omitted:
        warn(f"--plot draws the first {len(sink.pairs)} of {len(plan.pairs)} (output, input) pairs; choose others "
             "with --of/--wrt", quiet)
    return sink


def compute_plots(sink, plan, reduce: str):
    from ..render.plots import compute_plots as draw

    ys = plan.ys if any(v.saliency is not None for v in sink.views.values()) else {}
    return draw(sink.ordered(), plan.xs, ys, plan.batch, reduce)


def save(plot_list, paths: list[Path], quiet: bool) -> list[Path]:
    """Draw and write every plot to every target, each file atomically (a failure leaves
    no part of a file and an existing file as it was)."""
    from ..io.writers import write_bytes_atomic
    from ..render.plots import file_name, pictures

    together = separate = None
    written = []
    for target in paths:
        if target.is_dir():
            separate = separate or pictures(plot_list, together=False)
            for picture in separate:
                dest = target / f"{file_name(picture.name)}.png"
                write_bytes_atomic(str(dest), picture.encode(".png"))
                written.append(dest)
        else:
            together = together or pictures(plot_list, together=True)
            write_bytes_atomic(str(target), together[0].encode(target.suffix))
            written.append(target)
    if not quiet:
        click.echo(f"Wrote {', '.join(map(str, written))}", err=True)
    return written
