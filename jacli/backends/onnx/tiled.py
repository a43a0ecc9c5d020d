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
* MaxPool's ``Indices`` (flat, so they count the batch offset) are its indices on the B
  samples, tiled, copy j's offset by j times the size of the pool's input;
* any other tensor that depends on the inputs (sizes computed with ``Shape``, tensors of
  unknown shape) is computed again by a copy of its node on the tiled values, as the
  folded graph would;
* tensors that do not depend on the inputs (weights, constants) are used as they are.

Where the derivative node broadcasts (an elementwise sum, difference, product or quotient,
or a MatMul over its batch axes) and reads such a tiled value, it reads the value on the B
samples instead: its seed inputs' k*B rows are split into (k, B) by a Reshape, numpy
broadcasting repeats the B samples' values over the k copies, and the result's axes are
joined again (``_broadcasting``). No k copies are made: on the transformer block at 16
samples, one thread, the Tiles had been 13% of onnxruntime's kernel time and the products
reading them 30%.

Derivative nodes that read no seed (a rule's factors computed from forward values, such as
Tanh's 1 - y^2) count as forward nodes: they run on the B samples, and their results are
tiled. Before that, :func:`fuse` turns chains of elementwise products and sums on the seeds
into one product with such a factor. So the result equals the folded graph's (up to float
rounding) wherever samples are independent (the promise ``per_sample`` makes), at the cost
of the forward pass once plus the tiles.
"""
from __future__ import annotations

import numpy as np
import onnx

from ...errors import UnsupportedError
from .graph import FLOAT_TYPES, Builder, Info, _node_inputs, _subgraph_inputs

BATCH = "jacli:batch"  # the symbolic size of the B samples' axis in a tiled graph
SEEDS = "jacli:seeds"  # that of the k*B seeds' axis


def data_inputs(model: onnx.ModelProto, weights=frozenset()) -> list[onnx.ValueInfoProto]:
    """The graph inputs that hold samples: not initializers, nor ``weights`` (inputs fed the
    model's own weights, the same for every sample)."""
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits and vi.name not in weights]


def rename_batch(model: onnx.ModelProto, weights=frozenset()) -> None:
    """Name the leading axis of every data input (``data_inputs``) and graph output
    :data:`BATCH` (they share it: the protocol's batch axis); an axis with a fixed size
    cannot be tiled."""
    data = data_inputs(model, weights)
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


def tile(model: onnx.ModelProto, info: Info, b: Builder, results: dict[str, str],
         seeds: list[onnx.ValueInfoProto], weights=frozenset()) -> dict[str, str]:
    """Rewrite the derivative nodes ``b.nodes`` (and ``results``: public name -> tensor) for
    ``seeds`` (the value infos of the seed inputs, still with B rows) of k*B rows: first
    :func:`fuse` (with shapes inferred over the whole graph), then :func:`retarget`.
    Returns the new ``results``."""
    dims, types = dict(info.dims), dict(info.types)
    fed = list(b.inputs.values())  # weights the derivative graph is fed (adjoint kernels)
    _infer(_skeleton(model, [*model.graph.node, *b.nodes], b.initializers, [*seeds, *fed]), dims, types)
    for vi in seeds:  # graph inputs, which inference does not list
        t = vi.type.tensor_type
        types.setdefault(vi.name, t.elem_type)
        dims.setdefault(vi.name, _dims(t))
    names = [vi.name for vi in seeds]
    results = fuse(b, results, names, dims, types)
    return retarget(model, info, b, results, names, dims, types, weights)


def retarget(model: onnx.ModelProto, info: Info, b: Builder, results: dict[str, str],
             seeds: list[str], dims: dict, types: dict, weights=frozenset()) -> dict[str, str]:
    """Rewrite the derivative nodes ``b.nodes`` (and ``results``) to read tiled forward
    values, as the module says; ``seeds``: the k*B-row inputs; ``dims``/``types``: what
    shape inference knows. Derivative nodes that read no seed (a rule's factors of primal
    values only, such as GELU's derivative) run on the B samples beside the forward nodes
    and count as forward values. Returns the new ``results``."""
    data = [vi.name for vi in data_inputs(model, weights)]
    seeded, primal, rest = set(seeds), [], []
    for node in b.nodes:
        if any(i in seeded for i in _node_inputs(node)):
            seeded |= {o for o in node.output if o}
            rest.append(node)
        else:
            primal.append(node)
    world = [*model.graph.node, *primal]  # what runs on the B samples
    varying, producer = set(data), {}
    for node in world:
        producer.update((o, node) for o in node.output if o)
        if any(i in varying for i in _node_inputs(node)):
            varying |= {o for o in node.output if o}
    if any(_subgraph_inputs(node) & varying for node in rest):
        raise UnsupportedError("a derivative node reads forward values inside a subgraph")
    guessed = info.guessed

    def axis(name: str) -> int | None:
        if name in data:
            return 0
        d = dims.get(name)
        if name in guessed or not d or types.get(name) not in FLOAT_TYPES or d.count(BATCH) != 1:
            return None
        return d.index(BATCH)

    def rank(name: str) -> int:
        if dims.get(name) is None:
            raise UnsupportedError(f"the rank of '{name}' is unknown")
        return len(dims[name])

    def shape_of_tileable(node) -> bool:
        return node.op_type == "Shape" and not node.attribute and axis(node.input[0]) is not None

    def broadcast_axis(node) -> int | None:
        """The batch axis a of a node of ``_BROADCASTING`` that can read its forward inputs
        on the B samples, broadcast, instead of tiled: they could be tiled along one axis a
        (not a matrix axis of MatMul), at the rank of the output; its seed inputs have that
        rank too, and their axis a holds the k*B rows (the batch symbol, or a symbol that
        shape inference made up for it, never a size it knows), as the output's does;
        inputs of neither kind (weights) do not reach left of axis a."""
        out = dims.get(node.output[0]) if len(node.output) == 1 else None
        if node.op_type not in _BROADCASTING or node.attribute or not out or node.output[0] in guessed:
            return None
        r = len(out)
        forward = {axis(i) for i in node.input if i in varying and i not in seeded}
        a = forward.pop() if len(forward) == 1 else None
        if a is None or (node.op_type == "MatMul" and a >= r - 2):
            return None

        def rows(d) -> bool:  # the k*B rows on axis a
            return bool(d) and len(d) == r and not isinstance(d[a], int) and d.count(BATCH) == (d[a] == BATCH)

        if not rows(out):
            return None
        for i in node.input:
            d = dims.get(i)
            if i in seeded:
                if not rows(d):
                    return None
            elif i in varying:
                if len(d) != r:
                    return None
            elif d is None or len(d) > r - a:
                return None
        return a

    broadcast = {id(node): a for node in rest if (a := broadcast_axis(node)) is not None}
    b.nodes = primal
    copies_of = _Copies(b, data[0], seeds[0])
    repeats = copies_of.repeats
    needed, copies, primed = set(), set(), {}
    todo = [i for node in rest if id(node) not in broadcast for i in _node_inputs(node) if i in varying]
    todo += [t for t in results.values() if t in varying]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if axis(name) is not None:
            primed[name] = b.op("Tile", name, repeats(axis(name), rank(name)))
        elif shape_of_tileable(node):  # the shape of a tiled tensor: k times on the batch axis
            primed[name] = b.op("Mul", name, repeats(axis(node.input[0]), rank(node.input[0])))
        elif (node.op_type == "MaxPool" and name in node.output[1:] and axis(node.input[0]) == 0
              and not any(a.name == "storage_order" and a.i for a in node.attribute)):
            primed[name] = copies_of.indices(name, node.input[0], rank(node.input[0]))
        else:  # computed again on tiled values
            if _subgraph_inputs(node) & varying:
                raise UnsupportedError(f"{node.op_type} node '{node.name}' to recompute has a subgraph")
            copies.add(id(node))
            todo += [i for i in node.input if i in varying]
    for node in world:
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
    ordered = b.nodes
    for node in rest:
        if id(node) in broadcast:
            b.nodes = []
            _broadcasting(b, node, broadcast[id(node)], seeded, varying, copies_of.rows())
            ordered += b.nodes
            continue
        for j, i in enumerate(node.input):
            node.input[j] = primed.get(i, i)
        ordered.append(node)
    b.nodes = ordered
    return {public: primed.get(t, t) for public, t in results.items()}


def _broadcasting(b: Builder, node, a: int, seeded: set, varying: set, rows: str) -> None:
    """Emit ``node`` (see ``retarget``'s ``broadcast_axis``) on its seed inputs split along
    axis ``a`` into (k, B) and its forward inputs as they are (an axis of 1 before the B
    samples where a > 0), its result joined back: numpy broadcasting does the tiling, with
    no k copies of the forward values made (Reshape splits and joins the axis in place)."""
    def reshaped(x: str, cut: str) -> str:
        shape = b.op("Shape", x)
        parts = [b.op("Slice", shape, b.ints([0]), b.ints([a]))] if a else []
        parts += [cut, b.op("Slice", shape, b.ints([a + (2 if cut is merged else 1)]), b.ints([_END]))]
        return b.op("Reshape", x, b.op("Concat", *parts, axis=0))

    split, merged = b.op("Concat", b.ints([-1]), rows, axis=0), b.ints([-1])
    for j, i in enumerate(node.input):
        if i in seeded:
            node.input[j] = reshaped(i, split)
        elif i in varying and a:
            node.input[j] = b.unsqueeze(i, [a])
    out, node.output[0] = node.output[0], b.fresh(f"split/{node.op_type}")
    b.nodes.append(node)
    reshaped(node.output[0], merged)
    b.nodes[-1].output[0] = out


def _skeleton(model: onnx.ModelProto, nodes, initializers, inputs) -> onnx.ModelProto:
    """``model`` running ``nodes``, with ``inputs`` added, for shape inference: weights of
    more than 64 elements become graph inputs of their type and shape (no copy of their data;
    inference reads the values of small ones, such as shapes, only)."""
    declared = {vi.name for vi in model.graph.input}  # weights with a graph input of their own (IR < 4)
    weights = [t for t in [*model.graph.initializer, *initializers] if t.name not in declared]
    small = [t for t in weights if np.prod(t.dims) <= 64]
    large = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights
             if np.prod(t.dims) > 64]
    graph = onnx.helper.make_graph(nodes, "skeleton", [*model.graph.input, *large, *inputs], list(model.graph.output),
                                   initializer=small)
    out = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


def _infer(model: onnx.ModelProto, dims: dict, types: dict) -> None:
    """Add the shapes and element types onnx's shape inference finds in ``model`` to
    ``dims`` and ``types`` (nothing where it fails)."""
    try:
        graph = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    except Exception:  # then the values it would have found are computed again, not tiled
        return
    for vi in graph.value_info:
        t = vi.type.tensor_type
        if vi.name in dims or not vi.type.HasField("tensor_type") or not t.HasField("shape"):
            continue
        types[vi.name] = t.elem_type
        dims[vi.name] = _dims(t)


def _dims(t) -> list:
    """A tensor type's shape: sizes, symbols, None where unnamed."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


_LINEAR = {"Mul", "Div", "Neg", "Add", "Sub", "Identity"}
# ops that broadcast (MatMul over its batch axes): they read forward values on the B samples
# (``_broadcasting``)
_BROADCASTING = {"Mul", "Div", "Add", "Sub", "MatMul"}
_END = np.iinfo(np.int64).max  # Slice to the end


def fuse(b: Builder, results: dict[str, str], seeds: list[str], dims: dict, types: dict) -> dict[str, str]:
    """Collapse runs of elementwise linear steps on seed-dependent tensors (a product or
    quotient by a seed-free tensor, a negation, sums of such terms of one tensor), which
    the rules emit one per forward node (GELU written out: five nodes and three tiled
    factors), into one product of the run's first tensor and a seed-free coefficient, run
    on the B samples (and then tiled once). A step fuses only where shape inference shows
    it keeps its seed-dependent operand's shape; nothing fuses in a graph with subgraphs
    (they could read a tensor fused away). Returns the new ``results``."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in b.nodes for a in n.attribute):
        return results
    seeded = set(seeds)
    rep: dict[str, tuple[str, str | None]] = {}  # seed-dependent tensor -> (root, coefficient or None: 1)
    made: dict[str, str] = {}
    kept = []

    def same(*names: str) -> bool:
        ds = [dims.get(n) for n in names]
        return all(d is not None and None not in d and d == ds[0] for d in ds)

    def one(like: str) -> str:
        return b.scalar(1.0, types.get(like, onnx.TensorProto.FLOAT))

    def coefficient(op: str, like: str, *terms: str) -> str:
        name = b.op(op, *terms)
        kept.append(b.nodes.pop())
        shapes = [dims.get(t) for t in terms]
        dims[name] = _broadcast(shapes) if all(d is not None for d in shapes) else None
        types[name] = types.get(like, onnx.TensorProto.FLOAT)
        return name

    def value(name: str) -> str:
        """The tensor itself, made from its root and coefficient where it was fused away."""
        if name not in rep:
            return name
        root, c = rep[name]
        if c is None:
            return root
        if name not in made:
            made[name] = b.op("Mul", root, c)
            kept.append(b.nodes.pop())
            dims[made[name]], types[made[name]] = dims.get(name), types.get(name)
        return made[name]

    derived, b.nodes = b.nodes, []
    for node in derived:
        ins = list(node.input)
        if not any(i in seeded for i in ins):
            kept.append(node)
            continue
        out = node.output[0]
        fused = None
        if node.op_type in _LINEAR and not node.attribute and len(node.output) == 1:
            live = [i for i in ins if i in seeded]
            numerator = node.op_type == "Mul" or ins[0] in seeded  # a seed-free divisor only
            if node.op_type in ("Mul", "Div") and len(live) == 1 and numerator and same(out, live[0]):
                root, c = rep.get(live[0], (live[0], None))
                p = ins[1] if ins[0] == live[0] else ins[0]
                if node.op_type == "Div":
                    p = coefficient("Reciprocal", out, p)
                fused = (root, coefficient("Mul", out, c, p) if c else p)
            elif node.op_type in ("Neg", "Identity") and same(out, ins[0]):
                root, c = rep.get(ins[0], (ins[0], None))
                fused = (root, coefficient("Neg", out, c or one(out)) if node.op_type == "Neg" else c)
            elif node.op_type in ("Add", "Sub") and len(live) == 2 and same(out, *ins):
                (ra, ca), (rb, cb) = (rep.get(i, (i, None)) for i in ins)
                if ra == rb:
                    fused = (ra, coefficient(node.op_type, out, ca or one(out), cb or one(out)))
        if fused is not None:
            rep[out] = fused
            seeded.add(out)
            continue
        for j, i in enumerate(ins):
            node.input[j] = value(i) if i in seeded else i
        seeded |= {o for o in node.output if o}
        kept.append(node)
    results = {public: value(t) for public, t in results.items()}
    b.nodes = kept
    return results


def _broadcast(shapes: list[list]) -> list:
    """Numpy broadcasting of symbolic shapes (None where it cannot tell)."""
    rank = max(len(d) for d in shapes)
    out = []
    for axis in range(rank):
        sizes = {d[axis - rank + len(d)] for d in shapes if axis - rank + len(d) >= 0} - {1}
        out.append(sizes.pop() if len(sizes) == 1 else (1 if not sizes else None))
    return out


class _Copies:
    """k = rows of ``seed`` / rows of ``x``, computed at run time (once), and what is made
    of it: Tile repeats and MaxPool's indices into the tiled input."""

    def __init__(self, b: Builder, x: str, seed: str):
        self.b, self.x, self.seed, self._made = b, x, seed, {}

    def k(self) -> str:
        if "k" not in self._made:  # fresh Shape nodes: the Builder's may read a seed after these
            rows = [self.b.op("Slice", self.b.op("Shape", v), self.b.ints([0]), self.b.ints([1]))
                    for v in (self.seed, self.x)]
            self._made["k"] = self.b.op("Div", *rows)
        return self._made["k"]

    def rows(self) -> str:
        """B, the rows of ``x``, as a 1-element vector."""
        if "rows" not in self._made:
            self._made["rows"] = self.b.op("Slice", self.b.op("Shape", self.x), self.b.ints([0]), self.b.ints([1]))
        return self._made["rows"]

    def repeats(self, axis: int, rank: int) -> str:
        """Tile's repeats putting k copies along ``axis`` of a tensor of rank ``rank``."""
        if (axis, rank) not in self._made:
            self._made[axis, rank] = self.b.ivec([1] * axis + [self.k()] + [1] * (rank - axis - 1))
        return self._made[axis, rank]

    def indices(self, indices: str, x: str, rank: int) -> str:
        """MaxPool's flat ``indices`` into ``x`` (batch axis first) as the pool of the tiled
        ``x`` gives them: copy j's indices offset by j times the size of ``x``."""
        b = self.b
        tiled = b.op("Tile", indices, self.repeats(0, rank))
        rows = b.op("Reshape", tiled, b.op("Concat", self.k(), b.ints([-1]), axis=0))
        start, size = b.const(np.array(0, np.int64)), b.op("Cast", b.op("Size", x), to=onnx.TensorProto.INT64)
        offsets = b.op("Range", start, b.op("Squeeze", self.k()), b.const(np.array(1, np.int64)))
        shifted = b.op("Add", rows, b.unsqueeze(b.op("Mul", offsets, size), [1]))
        return b.op("Reshape", shifted, b.op("Shape", tiled))
