"""The model's function in double precision, for finite differences."""
from __future__ import annotations

import itertools
import re

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...errors import UnsupportedError
from .graph import FLOAT_TYPES, _prepare

# =====================================================================================
# float64
# =====================================================================================
_DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype"}


def _to_double_tensor(t: TensorProto) -> TensorProto:
    if t.data_type not in FLOAT_TYPES or t.data_type == TensorProto.DOUBLE:
        return t
    return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name)


def _graph_to_double(graph: onnx.GraphProto) -> None:
    for vi in itertools.chain(graph.input, graph.output, graph.value_info):
        if vi.type.tensor_type.elem_type in FLOAT_TYPES:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    for i, t in enumerate(graph.initializer):
        graph.initializer[i].CopyFrom(_to_double_tensor(t))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                attr.t.CopyFrom(_to_double_tensor(attr.t))
            elif attr.type == onnx.AttributeProto.GRAPH:
                _graph_to_double(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _graph_to_double(g)
            elif attr.name == _DTYPE_ATTRS.get(node.op_type) and attr.i in FLOAT_TYPES:
                attr.i = TensorProto.DOUBLE
        if node.op_type == "Constant":
            for attr in list(node.attribute):
                if attr.name in ("value_float", "value_floats"):
                    value = np.array(helper.get_attribute_value(attr), np.float64)
                    node.attribute.remove(attr)
                    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same function in double precision (float inputs, outputs, initializers,
    constants and casts made double). Raises UnsupportedError when onnxruntime (CPU) has
    no double kernel for one of the operators."""
    import onnxruntime as ort

    out = _prepare(model)
    _graph_to_double(out.graph)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(out.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        match = re.search(r"implementation for (\w+)\(\d+\) node with name '([^']*)'", str(exc))
        if match:
            raise UnsupportedError(
                f"operator '{match.group(1)}' (node '{match.group(2)}') has no double-precision kernel in "
                "onnxruntime (CPU), so this model cannot be evaluated in float64"
            ) from exc
        raise UnsupportedError(f"the float64 version of the model does not load in onnxruntime: {exc}") from exc
    return out
