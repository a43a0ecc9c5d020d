"""The terminal view of ``diff`` results (from the JSON document)."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

SHOW = 5  # worst entries listed per differing comparison


def diff_view(doc: dict) -> Group:
    verdict = ("AGREE", "bold green") if doc["passed"] else ("DIFFER", "bold red")
    b = doc["b"]
    other = f"baseline {b['baseline']}" if "baseline" in b else f"{b['model']} [{b['format']}/{b['backend']}]"
    a = doc["a"]
    parts = [Text.assemble(("Derivative diff ", "bold"), verdict, "  ", ("A ", "bold"),
                           f"{a['model']} [{a['format']}/{a['backend']}]", "  ", ("B ", "bold"), other)]
    links = [f"{l['a']}↔{l['b']}" + (f":{l['layout']}" if l["layout"] else "") + f" ({l['how']})"
             for kind in ("inputs", "outputs") for l in doc["links"][kind]]
    parts.append(Text("matched " + ", ".join(links), style="dim"))
    for note in doc["notes"]:
        parts.append(Text(f"note: {note}", style="yellow"))
    t = Table(box=None, pad_edge=False)
    for col, just in (("compared", "left"), ("entries", "right"), ("max |A−B|", "right"), ("max rel", "right"),
                      ("differ", "right"), ("", "left")):
        t.add_column(col, justify=just)
    rows = [("output " + c["name"], c) for c in doc["outputs"]]
    rows += [(("J·v → " + c["of"] if c.get("probe") == "jvp" else "Jᵀc → " + c["wrt"]) if doc["kind"] == "directions"
              else c["name"], c) for c in doc["jacobians"]]
    for label, c in rows:
        t.add_row(label, str(c["entries"]), f"{c['max_abs_error']:.3g}", f"{c['max_rel_error']:.3g}",
                  str(c["mismatches"]), Text("ok", style="green") if c["passed"] else Text("DIFFERS", style="bold red"))
    tolerances = sorted({(c["check_stat"], c["atol"], c["rtol"]) for _, c in rows})
    parts.append(Text("pass when " + "; ".join(_criterion(*t) for t in tolerances), style="dim"))
    parts.append(t)
    if doc["kind"] == "directions":
        parts.append(Text(f"{doc['directions']} random probe(s) per sample (J·v and Jᵀc): a difference whose largest entry is "
                          f"10× its tolerance escapes all of them with probability ≤ {doc['miss_probability']:.2g}",
                          style="dim"))
    for label, c in rows:
        if c["passed"]:
            continue
        parts.append(Text(f"{label}: {c['mismatches']} of {c['entries']} entries differ; worst:", style="red"))
        for e in c["worst"][:SHOW]:
            parts.append(Text(f"  {_where(c, e)}: A {e['a']:.6g}, B {e['b']:.6g}, |A−B| {e['abs_error']:.3g}, "
                              f"rel {e['rel_error']:.3g}"))
    loc = doc.get("locate")
    if loc is not None:
        parts.append(_locate(loc))
    return Group(*parts)


def _criterion(stat: str, atol: float, rtol: float) -> str:
    if stat == "elementwise":
        return f"every entry has |A−B| ≤ {atol:g} or |A−B|/|B| ≤ {rtol:g}"
    return f"the {stat} |A−B| ≤ {atol:g} or the {stat} |A−B|/|B| ≤ {rtol:g}"


def _where(c: dict, e: dict) -> str:
    sample = "" if e.get("sample") is None else f"sample {e['sample']}, "
    if "direction" in e:
        return f"{sample}probe {e['direction']}, [{_idx(e['index'])}]"
    if "input_index" not in e:
        return f"{sample}{c['of']}[{_idx(e['output_index'])}]"
    return f"{sample}d{c['of']}[{_idx(e['output_index'])}]/d{c['wrt']}[{_idx(e['input_index'])}]"


def _idx(i) -> str:
    return ",".join(map(str, i))


def _locate(loc: dict) -> Text:
    if not loc["available"]:
        return Text(f"locate: unavailable: {loc['reason']}", style="yellow")
    if not loc["found"]:
        return Text(f"locate: all {loc['checked']} intermediate tensors the graphs share agree in J·v "
                    "(the difference arises in tensors only one graph has)", style="yellow")
    values = ("its values agree, so the derivative differs where the function does not" if loc["values_agree"]
              else "its values differ too")
    op = loc["op_type"] if loc["op_type"] == loc["b_op_type"] else f"{loc['op_type']} in A, {loc['b_op_type']} in B"
    return Text.assemble(("locate: ", "bold"), "first differing node ", (loc["node"], "bold red"), f" ({op}), output ",
                         loc["tensor"], f": max |ΔJ·v| {loc['max_abs_error']:.3g}; {values}; "
                         f"the {loc['agreeing_before']} shared tensors before it agree")
