"""Terminal views of ``svd`` and ``det`` results, built from their JSON documents."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

SHOW_SAMPLES = 8
SHOW_VALUES = 4


def svd_view(doc: dict) -> Group:
    """Per-sample σ_max, σ_min, condition number and leading singular values; then the
    spread over all samples."""
    m, n = doc["shape"]
    how = {"full": "full SVD", "matrix-free": f"matrix-free, {doc.get('iterations', 0)} iterations"}[doc["solver"]]
    parts = [_title("Singular values", f"({how}) of J, {m}×{n} per sample ({_pairs(doc)})", doc)]
    samples, full = doc["samples"], doc["solver"] == "full"
    t = Table(box=None, pad_edge=False)
    for col in ("sample", "σ_max", "σ_min", "cond", "rank" if full else "±bound"):
        t.add_column(col, justify="right")
    t.add_column("singular values, largest first")
    for s in samples[:SHOW_SAMPLES]:
        values = s["singular_values"]
        low = s.get("smallest_singular_values") or (values if len(values) == min(m, n) else None)
        t.add_row(str(s["index"]), _f(values[0]), _f(low[-1]) if low else "—", _f(s["condition_number"]),
                  str(s["rank"]) if full else _f(max(float(v) for v in s["error_bounds"])),
                  " ".join(_f(v, 4) for v in values[:SHOW_VALUES]) + (" …" if len(values) > SHOW_VALUES else ""))
    parts.append(t)
    parts += _more(samples)
    summary = doc["summary"]
    parts.append(_spread("σ_max", summary["sigma_max"], len(samples),
                         "an empirical lower bound on the Lipschitz constant"))
    if summary["condition_number"]["max"] != "NaN":
        parts.append(_spread("condition number", summary["condition_number"], len(samples)))
    return Group(*parts)


def det_view(doc: dict) -> Group:
    n = doc["shape"][0]
    parts = [_title("Determinant", f"of J, {n}×{n} per sample ({_pairs(doc)})", doc)]
    t = Table(box=None, pad_edge=False)
    for col in ("sample", "sign", "log|det J|", "±", "det J", "cond", ""):
        t.add_column(col, justify="left" if not col else "right")
    samples = doc["samples"]
    for s in samples[:SHOW_SAMPLES]:
        note = ""
        if s["singular"]:
            note = (f"singular (σ_min/σ_max {_f(s['rcond'])} ≤ {_f(doc['singular_tol'])})" if doc.get("singular_tol")
                    else "singular (rank deficient at the model's precision, as svd finds it)")
        elif s["ill_conditioned"]:
            note = "ill-conditioned (κ₂ ≥ 1/√eps)"
        elif s["det_overflow"]:
            note = "|det J| overflows float64; log|det J| is exact"
        elif s["det_underflow"]:
            note = "|det J| underflows float64; log|det J| is exact"
        sign = {1.0: "+1", -1.0: "-1", 0.0: "0"}.get(s["sign"], _f(s["sign"]))
        error = "" if s["singular"] else _f(s["logabsdet_error"], 2)
        t.add_row(str(s["index"]), sign, _f(s["logabsdet"]), error, _f(s["det"]), _f(s["condition_number"], 3),
                  Text(note, style="yellow" if note else ""))
    parts.append(t)
    parts += _more(samples)
    parts.append(_spread("log|det J|", doc["summary"]["logabsdet"], len(samples)))
    for kind in ("singular", "ill_conditioned"):
        if doc["summary"].get(kind):
            parts.append(Text(f"{doc['summary'][kind]} of {len(samples)} samples {kind.replace('_', '-')}",
                              style="yellow"))
    return Group(*parts)


def _title(what: str, how: str, doc: dict) -> Text:
    return Text.assemble((what + " ", "bold"), how, "  ", ("model ", "bold"), doc["model"],
                         f" [{doc['format']}/{doc['backend']}]")


def _pairs(doc: dict) -> str:
    return ", ".join(doc["jacobians"])


def _more(samples: list) -> list:
    if len(samples) <= SHOW_SAMPLES:
        return []
    return [Text(f"… {len(samples) - SHOW_SAMPLES} more samples (use --json or -o for all)", style="dim")]


def _spread(name: str, s: dict, count: int, meaning: str = "") -> Text:
    return Text(f"{name} over {count} sample{'s' if count != 1 else ''}: max {_f(s['max'])}, median {_f(s['median'])}, "
                f"min {_f(s['min'])}" + (f"  ({meaning})" if meaning else ""))


def _f(v, digits: int = 6) -> str:
    if isinstance(v, str):  # JSON's non-finite numbers
        return {"Infinity": "inf", "-Infinity": "-inf"}.get(v, v.lower())
    return f"{v:.{digits}g}"
