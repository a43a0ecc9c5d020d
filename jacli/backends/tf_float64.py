"""A SavedModel's serving signature evaluated in float64: the reference finite differences
of a SavedModel are taken of (``TFModel._forward64``).

A SavedModel's graph is fixed in its dtype, so a float64 twin is made from it, as the ONNX
backend does for graphs onnxruntime has no double kernels for:

1. it starts from the signature as jacli runs it, its functions inlined into one GraphDef
   whose variables are placeholders for their handles (tf_inline.py);
2. every float32 in that GraphDef becomes float64: the type attributes of every node (and
   of the functions loops call), placeholders, constants (their values cast), casts;
3. operations TensorFlow has no float64 form of are written as arithmetic
   (``FusedBatchNorm``/``V2``/``V3`` in inference, what tf_keras's BatchNormalization
   saves), in operations of the SavedModel allow-list (savedmodel_checks.py);
4. each float32 variable gets a float64 twin, cast once, and the retyped GraphDef is
   imported into a graph function bound to the twins' handles (the weights are not frozen
   into the graph as constants).

Anything else fails with a ``LimitationError`` that names the operation (an operation with
no float64 form, such as ``LRN``, a float16 graph, a signature that is not inlined), and
the check then differences in the model's float32, with a note saying why.
"""
from __future__ import annotations

import re

import numpy as np

from ..errors import LimitationError
from ._common import short

# inference batch normalization: y = x·k + (offset − mean·k), k = scale·rsqrt(variance + epsilon)
_BATCH_NORMS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
EMITTED = ("Const", "AddV2", "Rsqrt", "Mul", "Sub", "Reshape")  # the operations the rewrite adds


def float64_function(tf, inlined, input_names: list[str]):
    """A function of the signature's inputs (positionally, in ``input_names`` order, float
    ones as float64) returning ``{output name: float64 tensor}``, from the signature as
    inlined (tf_inline.InlinedSignature); its float variables get float64 twins, made once."""
    retyped = retype(tf, inlined.graph_def)
    handles = {id(v.handle): v for v in inlined.variables}
    twins, captures = [], []
    for name, value in inlined.captures:
        variable = handles.get(id(value))
        if variable is not None and variable.dtype == tf.float32:
            twins.append(tf.Variable(tf.cast(variable, tf.float64), trainable=False))
            value = twins[-1].handle
        elif variable is None and value.dtype == tf.float32:  # a captured tensor
            value = tf.cast(value, tf.float64)
        captures.append((name, value))
    twin = inlined.twin(retyped, captures)
    specs = [inlined.specs[n] for n in input_names]
    specs = [tf.TensorSpec(s.shape, tf.float64 if s.dtype == tf.float32 else s.dtype) for s in specs]
    try:
        graph = tf.function(lambda *xs: twin(**dict(zip(input_names, xs)))).get_concrete_function(*specs)
    except Exception as e:  # noqa: BLE001 — an op without a float64 form (its type attribute refuses double)
        raise LimitationError(f"this SavedModel's graph does not run in float64: {_op_error(e, retyped)}") from None
    graph.float64_variables = twins  # held as long as the function: its graph reads them through their handles
    return graph


def retype(tf, graph):
    """A copy of ``graph`` (a GraphDef) computing in float64 where it computed in float32."""
    out = type(graph)()
    out.CopyFrom(graph)
    narrow = {tf.float16.as_datatype_enum, tf.bfloat16.as_datatype_enum}
    nodes = list(out.node)
    norms = {n.name for n in nodes if n.op in _BATCH_NORMS}
    for node in nodes:  # the batch statistics and reserved space are read in training only
        for i in node.input:
            base, _, port = i.lstrip("^").partition(":")
            if base in norms and port not in ("", "0"):
                raise LimitationError(f"the operation {node.name} reads output {port} of the batch normalization "
                                      f"{base}")
    del out.node[:]
    for node in nodes:
        _retype_node(tf, node, narrow)
        out.node.extend(_batch_norm(tf, node) if node.op in _BATCH_NORMS else [node])
    for function in out.library.function:
        for arg in (*function.signature.input_arg, *function.signature.output_arg):
            if arg.type in narrow:
                raise LimitationError(f"the function {function.signature.name} computes in float16/bfloat16")
            if arg.type == tf.float32.as_datatype_enum:
                arg.type = tf.float64.as_datatype_enum
        for node in function.node_def:
            if node.op in _BATCH_NORMS:
                raise LimitationError(f"{node.op} inside the loop or function {function.signature.name}")
            _retype_node(tf, node, narrow)
    return out


def _retype_node(tf, node, narrow) -> None:
    f32, f64 = tf.float32.as_datatype_enum, tf.float64.as_datatype_enum
    for key, attr in node.attr.items():
        which = attr.WhichOneof("value")
        if which == "type":
            if attr.type in narrow:
                raise LimitationError(f"the operation {node.name} ({node.op}) computes in float16/bfloat16")
            if attr.type == f32:
                attr.type = f64
        elif which == "list" and attr.list.type:
            if any(t in narrow for t in attr.list.type):
                raise LimitationError(f"the operation {node.name} ({node.op}) computes in float16/bfloat16")
            attr.list.type[:] = [f64 if t == f32 else t for t in attr.list.type]
        elif which == "tensor" and attr.tensor.dtype == f32:
            value = tf.make_ndarray(attr.tensor).astype(np.float64)
            attr.tensor.CopyFrom(tf.make_tensor_proto(value, tf.float64, value.shape))


def _batch_norm(tf, node) -> list:
    """An inference ``FusedBatchNorm*`` (already retyped) as arithmetic; the node's name
    stays on its output 0. Its other outputs (batch statistics, reserved space) are only
    consumed in training, so a graph that reads them is refused."""
    if node.attr["is_training"].b:
        raise LimitationError(f"the operation {node.name} ({node.op}) is batch normalization in training mode")
    x, scale, offset, mean, variance = node.input[:5]
    controls = [i for i in node.input[5:] if i.startswith("^")]
    layout = node.attr["data_format"].s.decode() or "NHWC"
    if layout not in ("NHWC", "NCHW", "NDHWC", "NCDHW"):
        raise LimitationError(f"the operation {node.name} ({node.op}) has the layout {layout}")
    name = node.name
    new = []

    def op(kind, suffix, *inputs, **attrs):
        n = tf.compat.v1.NodeDef(name=f"{name}/jacli_float64/{suffix}", op=kind, input=list(inputs))
        for key, value in attrs.items():
            n.attr[key].CopyFrom(value)
        new.append(n)
        return n.name

    double = tf.compat.v1.AttrValue(type=tf.float64.as_datatype_enum)
    eps = op("Const", "epsilon", value=tf.compat.v1.AttrValue(tensor=tf.make_tensor_proto(
        float(np.float32(node.attr["epsilon"].f)), tf.float64)), dtype=double)
    k = op("Mul", "k", scale, op("Rsqrt", "rsqrt", op("AddV2", "var_eps", variance, eps, T=double), T=double), T=double)
    b = op("Sub", "b", offset, op("Mul", "mean_k", mean, k, T=double), T=double)
    if layout.startswith("NC"):  # per channel along axis 1: (C, 1, 1[, 1])
        shape = op("Const", "shape", value=tf.compat.v1.AttrValue(tensor=tf.make_tensor_proto(
            [-1] + [1] * (len(layout) - 2), tf.int32)), dtype=tf.compat.v1.AttrValue(type=tf.int32.as_datatype_enum))
        int32 = tf.compat.v1.AttrValue(type=tf.int32.as_datatype_enum)
        k = op("Reshape", "k_c", k, shape, T=double, Tshape=int32)
        b = op("Reshape", "b_c", b, shape, T=double, Tshape=int32)
    xk = op("Mul", "xk", x, k, T=double)
    out = tf.compat.v1.NodeDef(name=name, op="AddV2", input=[xk, b, *controls])
    out.attr["T"].CopyFrom(double)
    return [*new, out]


def _op_error(e: BaseException, graph) -> str:
    """The failure, naming the operation's type where TensorFlow names only the node."""
    text = short(e)
    node = re.search(r"\{\{node ([^}]+)\}\}", str(e))  # the node's name, or its last part
    named = [n for n in graph.node if node and (n.name == node.group(1) or n.name.endswith("/" + node.group(1)))]
    if named:
        reason = text.split(" ; NodeDef")[0].split("; NodeDef")[0].strip()
        return f"the operation {named[0].name} ({named[0].op}) has no float64 form ({reason})"
    return text
