"""Terminal view of ``jacli ops``: the ONNX operators with derivative rules."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text


def ops_table(rows: list[dict]) -> Group:
    t = Table(box=None, pad_edge=False)
    for col in ("operator", "versions", "VJP w.r.t.", "JVP w.r.t.", "outputs", "family"):
        t.add_column(col)
    for r in rows:
        if r["kind"] == "rule":
            versions = f"{r['since']}+" if r["until"] is None else f"{r['since']}-{r['until']}"
            t.add_row(r["op"], versions, ", ".join(r["vjp"]) or "-", ", ".join(r["jvp"]) or "-",
                      ", ".join(r["outputs"]), r["family"])
    parts = [t]
    for kind, title in (("zero", "zero derivative (integer/bool outputs)"),
                        ("piecewise", "zero almost everywhere (piecewise constant)")):
        names = [r["op"] for r in rows if r["kind"] == kind]
        parts.append(Text.assemble((f"{title}: ", "bold"), ", ".join(names)))
    n = len({r["op"] for r in rows if r["kind"] == "rule"})
    parts.append(Text(f"{n} operators with rules; versions are operator versions (onnx.defs since_version)"))
    return Group(*parts)
