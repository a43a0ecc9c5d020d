"""Derivative graphs that run the forward part once for k seeds (``derive``'s ``tiled=True``).

A folded call (``Model._folded``) repeats the inputs k times along the batch axis and runs
the whole VJP/JVP graph on k*B samples: the forward part, convolutions and matrix products
included, is computed k times over. The tiled graph takes the B samples as they are and
the k*B seeds (seed-major: row j*B + b is seed j of sample b, the folded order), runs the
forward nodes on B samples, and gives the derivative nodes, instead of each forward tensor
they read, the value the folded graph would have computed there:

* a graph input, or a float tensor whose batch axis shape inference knows (the one axis of
  size :data:`BATCH`, the symbol the inputs' and outputs' leading axes are renamed to), is
  ``Tile``d k times along that axis: the same values, since samples are independent;
* ``Shape`` of such a tensor is its shape with the batch entry multiplied by k (no tile);
* any other tensor that depends on the inputs (sizes computed with ``Shape``, MaxPool's
  ``Indices``, which count the batch offset, tensors of unknown shape) is computed again by
  a copy of its node on the tiled values, as the folded graph would;
* tensors that do not depend on the inputs (weights, constants) are used as they are.

So the result equals the folded graph's wherever samples are independent (the promise
``per_sample`` makes), at the cost of the forward pass once plus the tiles.
"""
from __future__ import annotations

import onnx
from onnx import helper

from ...errors import UnsupportedError
from .graph import Builder, Info, _node_inputs, _subgraph_inputs

BATCH = "jacli:batch"  # the symbolic size of the B samples' axis in a tiled graph
SEEDS = "jacli:seeds"  # that of the k*B seeds' axis


def rename_batch(model: onnx.ModelProto) -> None:
    """Name the leading axis of every graph input and output :data:`BATCH` (they share it:
    the protocol's batch axis); an axis with a fixed size cannot be tiled."""
    data = [vi for vi in model.graph.input if vi.name not in {t.name for t in model.graph.initializer}]
    for vi in [*data, *model.graph.output]:
        t = vi.type.tensor_type
        if not t.HasField("shape") or not t.shape.dim or t.shape.dim[0].HasField("dim_value"):
            raise UnsupportedError(f"tensor '{vi.name}' has no dynamic leading (batch) axis to tile")
        t.shape.dim[0].Clear()
        t.shape.dim[0].dim_param = BATCH


def seed_axis(value_info: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """The value info of a seed or result: the leading axis holds k*B rows."""
    value_info.type.tensor_type.shape.dim[0].Clear()
    value_info.type.tensor_type.shape.dim[0].dim_param = SEEDS
    return value_info


def retarget(model: onnx.ModelProto, info: Info, b: Builder, results: dict[str, str], seed: str) -> dict[str, str]:
    """Rewrite the derivative nodes ``b.nodes`` (and ``results``: public name -> tensor) to
    read tiled forward values, as the module says; ``seed`` is one k*B-row input. The new
    nodes go first in ``b.nodes``; returns the new ``results``."""
    forward = list(model.graph.node)
    inits = {t.name for t in model.graph.initializer}
    data = [vi.name for vi in model.graph.input if vi.name not in inits]
    varying = set(data)
    producer = {}
    for node in forward:
        for o in node.output:
            producer[o] = node
        if any(i in varying for i in _node_inputs(node)):
            varying |= {o for o in node.output if o}
    derived = b.nodes
    b.nodes = []
    for node in derived:
        if _subgraph_inputs(node) & varying:
            raise UnsupportedError(f"derivative node {node.op_type} reads forward values inside a subgraph")
    repeats = _repeats(b, data[0], seed)

    def axis(name: str) -> int | None:
        if name in data:
            return 0
        dims = info.dims.get(name)
        if name in info.guessed or not dims or not info.is_float(name) or dims.count(BATCH) != 1:
            return None
        return dims.index(BATCH)

    def rank(name: str) -> int:
        if info.dims.get(name) is None:
            raise UnsupportedError(f"the rank of '{name}' is unknown")
        return len(info.dims[name])

    shapes = set()  # Shape of a tileable tensor: its shape times k on the batch axis
    for node in derived:
        if node.op_type == "Shape" and not node.attribute and node.input[0] in varying and axis(node.input[0]) is not None:
            shapes.add(id(node))
    needed, copies = set(), set()
    todo = [i for node in derived if id(node) not in shapes for i in _node_inputs(node) if i in varying]
    todo += [t for t in results.values() if t in varying]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        if axis(name) is None:
            node = producer[name]
            if _subgraph_inputs(node) & varying:
                raise UnsupportedError(f"forward node {node.op_type} to recompute has a subgraph")
            copies.add(id(node))
            todo += [i for i in node.input if i in varying]
    primed = {}
    for name in sorted(needed):
        a = axis(name)
        if a is not None:
            primed[name] = b.op("Tile", name, repeats(a, rank(name)))
    for node in forward:
        if id(node) not in copies:
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = b.fresh(f"tiled/{node.op_type}")
        del copy.input[:], copy.output[:]
        copy.input.extend(primed.get(i, i) if i else "" for i in node.input)
        for o in node.output:
            if o:
                primed[o] = b.fresh(f"tiled/{o}")
            copy.output.append(primed.get(o, ""))
        b.nodes.append(copy)
    for node in derived:
        if id(node) in shapes:
            src = node.input[0]
            node.op_type, node.input[0] = "Mul", b.op("Shape", src)
            node.input.append(repeats(axis(src), rank(src)))
        else:
            for j, i in enumerate(node.input):
                node.input[j] = primed.get(i, i)
    b.nodes += derived
    return {public: primed.get(t, t) for public, t in results.items()}


def _repeats(b: Builder, x: str, seed: str):
    """``repeats(axis, rank)``: the Tile repeats putting k copies along ``axis``, with
    k = rows of ``seed`` / rows of ``x`` computed at run time (once per axis and rank)."""
    state: dict = {}

    def repeats(axis: int, rank: int) -> str:
        if "k" not in state:
            state["k"] = b.op("Div", b.dim(seed, 0), b.dim(x, 0))
        key = (axis, rank)
        if key not in state:
            state[key] = b.ivec([1] * axis + [state["k"]] + [1] * (rank - axis - 1))
        return state[key]

    return repeats
