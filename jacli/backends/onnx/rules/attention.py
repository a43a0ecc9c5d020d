"""Attention and RotaryEmbedding (opset 23): decomposed, exactly, into the function body
ONNX itself defines for them (the schema's context-dependent function, built for the
node's attributes and input types: the same graph as the node tests' ``_expanded``
models), which the drivers differentiate like any graph. Exporters that emit the
decomposition themselves (torch.onnx's scaled_dot_product_attention before opset 23:
MatMul, Softmax, Where, ...) need nothing more."""
from __future__ import annotations

import onnx
from onnx import GraphProto, TypeProto, ValueInfoProto, helper

from ..graph import Builder, Node
from .control import _inline
from .registry import decompose


def _function_body(b: Builder, n: Node) -> onnx.FunctionProto:
    schema = onnx.defs.get_schema(n.op_type, b.opset, "")
    types = []
    for name in n.inputs:
        if not name:
            types.append(TypeProto().SerializeToString())
            continue
        types.append(helper.make_tensor_type_proto(b.info.types.get(name, n.dtype), b.info.dims.get(name))
                     .SerializeToString())
    try:
        data = schema.get_context_dependent_function_with_opset_version(b.opset, n.proto.SerializeToString(), types)
    except Exception as exc:  # the schema cannot build a body for these attributes or types
        raise n.unsupported(f"has no ONNX function body for these attributes and inputs ({exc})") from None
    body = onnx.FunctionProto()
    body.ParseFromString(data)
    return body


@decompose("Attention", since=23, inputs=(0, 1, 2, 3, 4, 5))
@decompose("RotaryEmbedding", since=23, inputs=(0, 1, 2))
def _expand_function(b: Builder, n: Node) -> list:
    body = _function_body(b, n)
    graph = GraphProto()
    graph.node.extend(body.node)
    graph.output.extend(ValueInfoProto(name=o) for o in body.output)
    bound = {formal: actual for formal, actual in zip(body.input, n.inputs)}
    bound.update({formal: "" for formal in body.input[len(n.inputs):]})
    outs = _inline(b, graph, bound)
    return [o if public else None for o, public in zip(outs, n.outputs)]
