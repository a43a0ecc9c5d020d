"""Terminal views of ``inspect`` and ``compute`` results."""
from __future__ import annotations

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text

SHADES = " ·░▒▓█"
SHOW_SAMPLES = 8


def model_table(info: dict) -> Group:
    head = Text.assemble(("model ", "bold"), info["model"], "  ", ("format ", "bold"), info["format"], "  ",
                         ("backend ", "bold"), info["backend"])
    t = Table(box=None, pad_edge=False)
    for col in ("", "name", "shape", "dtype"):
        t.add_column(col)
    for kind in ("inputs", "outputs"):
        for s in info[kind]:
            t.add_row(kind[:-1], s["name"], _shape(s["shape"]), s["dtype"])
        if not info[kind]:
            t.add_row(kind[:-1], "(known after a forward pass)", "", "")
    return Group(head, t)


def compute_view(summaries, meta: dict) -> Group:
    """A table of per-sample statistics (the first few samples), aggregate lines, and a
    heatmap of |J| for each shown 2-D Jacobian."""
    parts = [Text.assemble(("Jacobian ", "bold"), f"{meta['method']}", f" ({meta['mode']})", "  ",
                           ("model ", "bold"), meta["model"], f" [{meta['format']}/{meta['backend']}]")]
    samples = sorted({s.index for s in summaries})
    shown = set(samples[:SHOW_SAMPLES])
    t = Table(box=None, pad_edge=False)
    for col, just in (("sample", "right"), ("d out/d in", "left"), ("shape", "left"), ("‖J‖_F", "right"),
                      ("max |J|", "right"), ("at (out, in)", "left"), ("zeros", "right")):
        t.add_column(col, justify=just)
    for s in summaries:
        if s.index in shown:
            t.add_row(str(s.index), f"d{s.of}/d{s.wrt}", "×".join(map(str, s.shape)), f"{s.frobenius:.6g}",
                      f"{s.max_abs:.6g}", f"{_idx(s.argmax[0])}, {_idx(s.argmax[1])}", f"{s.zero_fraction:.1%}"
                      + (f" ({s.nonfinite} NaN/Inf)" if s.nonfinite else ""))
    parts.append(t)
    if len(samples) > len(shown):
        fro = np.array([s.frobenius for s in summaries])
        parts.append(Text(f"… {len(samples) - len(shown)} more samples (use --json or -o for all); ‖J‖_F over all "
                          f"{len(samples)}: min {fro.min():.6g}, median {np.median(fro):.6g}, max {fro.max():.6g}",
                          style="dim"))
    for s in summaries:
        if s.index in shown and s.heatmap is not None and s.index == samples[0]:
            parts.append(heatmap(s))
    return Group(*parts)


def heatmap(s) -> Group:
    h = s.heatmap
    top = h.max()
    rows = []
    for r in h:
        levels = np.zeros(len(r), int) if top == 0 else np.ceil(r / top * (len(SHADES) - 1)).astype(int)
        rows.append(Text("│" + "".join(SHADES[v] for v in levels) + "│"))
    cap = Text(f"|J| sample {s.index} d{s.of}/d{s.wrt}: rows=outputs, cols=inputs"
               f"{', max-pooled' if h.shape != tuple(s.shape) else ''}; █={top:.3g}", style="dim")
    return Group(cap, *rows)


def _idx(i) -> str:
    return "(" + ",".join(map(str, i)) + ")" if len(i) != 1 else str(i[0])


def _shape(shape) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
