"""diff's comparisons beyond the two-model stream: against a baseline file, and --locate
(the first intermediate tensor whose derivative differs). Called by ``jacli.api.diff``."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .. import api
from ..engine import jacobian as jac
from ..errors import InputError
from ..model import Model


def baseline(a, path, x, wrt, of, maps, tol, batch, mode, directions, locate, chunk_size, max_memory, progress):
    from ..engine import diff as d
    from ..engine import mapping as mp
    from ..io.readers import Baseline

    if x is not None:
        raise InputError("a baseline brings its own input: give MODEL and BASELINE.h5 only")
    if directions:
        raise InputError("--directions compares two models; a baseline holds whole Jacobians: drop --directions")
    with Baseline(path) as base:
        batch = base.batch if batch is None else batch
        if base.batch != batch:
            raise InputError(f"the baseline was computed {'per sample' if base.batch else 'with --no-batch'}; "
                             f"{'drop' if base.batch else 'add'} --no-batch")
        check_maps(maps, a)
        in_links = mp.match(a.input_names(), base.input_names, maps, "input")
        xs = {}
        for l in in_links:
            v = base.xs[l.b]
            xs[l.a] = mp.permute(v, mp.to_a(l, v.ndim - 1))
        xs = api.as_inputs(a, xs)
        stored_of = sorted({j["of"] for j in base.jacobians.values()}, key=base.output_names.index)
        stored_wrt = sorted({j["wrt"] for j in base.jacobians.values()}, key=base.input_names.index)
        out_links = mp.match(api._names(of) or a.output_names(), base.output_names, maps, "output", a.output_names())
        back_in = {l.b: l.a for l in in_links}
        links = {"inputs": in_links, "outputs": [l for l in out_links if l.b in stored_of]}
        if not links["outputs"]:
            raise InputError(f"none of A's outputs match the baseline's differentiated outputs ({', '.join(stored_of)})")
        pa = jac.plan(a, xs, api._names(wrt) or [back_in[n] for n in stored_wrt if n in back_in],
                      [l.a for l in links["outputs"]], mode=mode, batch=batch)
        source = d.BaselineSource(base, pa, links)
        if set(source.ys) >= set(pa.of):
            outputs = d.compare_outputs(pa, source.ys, tol)
        else:
            outputs = []
        dtype = np.result_type(*(base.dtype(k) for k in source.keys.values()))
        jacobians = d.compare_jacobians(a, pa, source, tol, dtype, max_memory, chunk_size, progress)
        result = d.DiffResult(outputs, jacobians, links, "jacobian")
        if not outputs:
            result.notes.append("the baseline stores no outputs; only Jacobians were compared")
        if locate:
            result.locate = locate_baseline(a, base, pa, links, result)
    return result


def locate_baseline(a: Model, base, pa: jac.Plan, links: dict, result) -> dict:
    """The first node of ONNX model A whose output's J·v differs from the baseline's probes."""
    from ..engine import diff as d

    stored = base.probes()
    if a.format not in NAMED_GRAPHS:
        return {"available": False, "reason": f"--locate needs an ONNX model or a torch.export program as A (their "
                f"intermediate tensors have names); {a.path} is {a.format}"}
    if stored is None:
        return {"available": False, "reason": "the baseline holds no intermediate derivatives; write it with "
                "jacli compute MODEL.onnx INPUT -o BASELINE.h5 --locate-probes"}
    if any(l.layout for ls in links.values() for l in ls):
        return {"available": False, "reason": "--locate needs the model and the baseline in the same layout"}
    order, tangents, values_b, jvps_b = stored
    to_a = {l.b: l.a for l in links["inputs"]}
    tangents = {to_a[k]: v for k, v in tangents.items() if k in to_a}
    theirs = {t["tensor"]: t for t in order}
    mine, values_a, jvps_a = probe_intermediates(a, pa.xs, tangents)
    shared = [t for t in mine if t["tensor"] in theirs]
    if not shared:
        return {"available": False, "reason": "the model and the baseline's model have no intermediate tensor names "
                "in common"}
    atol, rtol = (result.jacobians[0].atol, result.jacobians[0].rtol) if result.jacobians else (None, None)
    found = d.first_difference(shared, theirs, values_a, values_b, jvps_a, jvps_b, atol, rtol, pa.dtype)
    return {"available": True, "sample": None, **found}


def check_maps(maps: Mapping, a: Model) -> None:
    names = set(a.input_names()) | set(a.output_names())
    for name in maps:
        if name not in names:
            raise InputError(f"--map {name}=...: A has no input or output {name!r} "
                             f"(inputs: {', '.join(a.input_names())}; outputs: {', '.join(a.output_names())})")


def locate(a: Model, b: Model, pa: jac.Plan, links: dict, result, seed: int) -> dict:
    """The first intermediate tensor of A (in its graph's order) whose J·v differs from B's
    tensor of the same name: ONNX models and torch.export programs name their tensors
    (the dynamo ONNX exporter keeps a program's names); else why it is unavailable."""
    from ..engine import diff as d
    from ..errors import JacliError

    def unavailable(reason: str) -> dict:
        return {"available": False, "reason": reason}

    unnamed = [m for m in (a, b) if m.format not in NAMED_GRAPHS]
    if unnamed:
        return unavailable(f"--locate compares named intermediate tensors (ONNX models, torch.export programs); "
                           f"{unnamed[0].path} is {unnamed[0].format}, whose intermediate tensors have no such names")
    if any(l.layout for ls in links.values() for l in ls):
        return unavailable("--locate needs both models in the same layout (a --map layout was given)")
    failing = [w for c in result.jacobians if not c.passed for w in c.worst[:1]]
    sample = (failing[0].get("sample") or 0) if failing and pa.batch else 0
    xs = {k: v[sample : sample + 1] for k, v in pa.xs.items()} if pa.batch else pa.xs
    rng = np.random.default_rng(seed)
    tangents = {i: rng.standard_normal(xs[i].shape).astype(xs[i].dtype) for i in pa.wrt}
    to_b = {l.a: l.b for l in links["inputs"]}
    try:
        mine, va, ja = probe_intermediates(a, xs, tangents)
        order_b, vb, jb = probe_intermediates(b, {to_b[k]: v for k, v in xs.items()},
                                               {to_b[k]: v for k, v in tangents.items()})
    except JacliError as e:
        return unavailable(f"the intermediate derivatives could not be computed: {e}")
    theirs = {t["tensor"]: t for t in order_b}
    shared = [t for t in mine if t["tensor"] in theirs]
    if not shared:
        return unavailable("the two models have no intermediate tensor names in common")
    atol, rtol = (result.jacobians[0].atol, result.jacobians[0].rtol) if result.jacobians else (None, None)
    found = d.first_difference(shared, theirs, va, vb, ja, jb, atol, rtol, pa.dtype)
    return {"available": True, "sample": sample if pa.batch else None, **found}


NAMED_GRAPHS = ("onnx", "torch-export")  # formats whose intermediate tensors have names


def probe_intermediates(model: Model, xs, tangents):
    """(order, values, J·v) of every float intermediate tensor of an ONNX model or a
    torch.export program, for one tangent per differentiated input."""
    if model.format == "onnx":
        from ..backends.onnx import locate as onnx_locate

        order = onnx_locate.intermediates(model.proto)
        values, jvps = onnx_locate.probe(model.proto, xs, tangents, order)
        return [{k: t[k] for k in ("tensor", "node", "op_type")} for t in order], values, jvps
    from ..backends import torch_locate

    return torch_locate.probe(model, xs, tangents)
