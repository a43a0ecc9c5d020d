"""Intermediate tensors of an ONNX model and their directional derivatives, for
``jacli diff --locate``: the graph with chosen intermediates exposed as extra outputs
(their values), and its JVP graph from ``derive.build_jvp`` with those intermediates
as the differentiated outputs (their J·v for one tangent)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from ...errors import ModelLoadError
from .._common import short
from .derive import build_jvp
from .graph import FLOAT_TYPES


def intermediates(proto: onnx.ModelProto) -> list[dict]:
    """Float tensors produced by the graph's nodes, in topological (node) order:
    ``{"tensor", "node", "op_type", "elem_type", "dims"}``."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
    except Exception:
        inferred = proto.graph
    types = {}
    for vi in [*inferred.value_info, *inferred.output, *proto.graph.output, *proto.graph.input]:
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.elem_type:
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim] \
                if t.HasField("shape") else None
            types.setdefault(vi.name, (t.elem_type, dims))
    out = []
    for node in proto.graph.node:
        for o in node.output:
            if o and o in types and types[o][0] in FLOAT_TYPES:
                out.append({"tensor": o, "node": node.name or o, "op_type": node.op_type,
                            "elem_type": types[o][0], "dims": types[o][1]})
    return out


def probe(proto: onnx.ModelProto, xs: Mapping[str, np.ndarray], tangents: Mapping[str, np.ndarray],
          tensors: Sequence[dict]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(values, J·v) of ``tensors`` (entries of :func:`intermediates`) at ``xs`` for the
    tangents (one per differentiated input, shaped like it)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    have = {o.name for o in exposed.graph.output}
    for t in tensors:
        if t["tensor"] not in have:
            exposed.graph.output.append(helper.make_tensor_value_info(t["tensor"], t["elem_type"], t["dims"]))
    names = [t["tensor"] for t in tensors]
    values = _run(exposed, dict(xs), names)
    jvp = build_jvp(exposed, list(tangents), names)
    feeds = {**xs, **{f"tan:{k}": v for k, v in tangents.items()}}
    derivs = _run(jvp, feeds, [f"jvp:{n}" for n in names])
    return values, {n: derivs[f"jvp:{n}"] for n in names}


def _run(proto: onnx.ModelProto, feeds: dict, names: list[str]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in sess.get_inputs()}
        values = sess.run(names, {k: np.ascontiguousarray(v) for k, v in feeds.items() if k in wanted})
    except Exception as e:
        raise ModelLoadError(f"onnxruntime cannot run the graph with its intermediates exposed: {short(e)}") from None
    return dict(zip(names, values))
