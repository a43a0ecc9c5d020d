"""Control flow on the differentiated path: Loop and Scan unrolled over their iterations,
If with a condition known before run time replaced by its branch, all exactly, as
decompositions the drivers then differentiate like any graph; If with a run-time
condition differentiated as an If of the derivative graphs of its two branches.

A Loop is unrolled when its trip count and the condition after every iteration can be
worked out before run time (from constants: the trip count input, and a condition that
depends only on the iteration number and constants, as in tf2onnx's while loops); a Scan
when the length of its scanned axis is static.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import GraphProto, NodeProto, TensorProto, helper, numpy_helper

from ..graph import Builder, Node, with_nodes
from .registry import decompose, jvp, vjp

_MAX_ITERATIONS = 4096  # a Loop without a trip count is unrolled while its condition holds, up to this


# --- inlining a subgraph ----------------------------------------------------------------
def _inline(b: Builder, graph: GraphProto, bound: dict[str, str]) -> list[str]:
    """Emit the nodes of ``graph`` with its inputs bound to ``bound`` (formal name -> tensor)
    and fresh names for everything it defines; names it does not define (outer scope) are
    kept. Returns the tensor of each of its outputs."""
    local = dict(bound)
    for init in graph.initializer:
        name = b.fresh("inlined")
        tensor = TensorProto()
        tensor.CopyFrom(init)
        tensor.name = name
        b.initializers.append(tensor)
        b.info.consts[name] = numpy_helper.to_array(init)
        local[init.name] = name
    for node in graph.node:
        new = NodeProto()
        new.CopyFrom(node)
        new.name = b.fresh(node.op_type)
        del new.input[:], new.output[:]
        new.input.extend(local.get(i, i) if i else "" for i in node.input)
        for o in node.output:
            if o:
                local[o] = b.fresh(f"{node.op_type}_out")
        new.output.extend(local.get(o, "") if o else "" for o in node.output)
        for attr in new.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                _rename_free(g, local)
        b.nodes.append(_folded(b, new))
    return [local.get(o.name, o.name) for o in graph.output]


_FOLDABLE = frozenset({"Add", "Sub", "Mul", "Div", "Mod", "Neg", "Unsqueeze", "Squeeze", "Concat", "Cast", "Gather",
                       "Reshape", "Slice", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "And",
                       "Or", "Not", "Identity", "Min", "Max"})


def fold_shapes(model: onnx.ModelProto, info) -> onnx.ModelProto:
    """The model with ``Shape`` of statically shaped tensors and the integer arithmetic on
    constants that follows (slice bounds, split sizes of a decomposed function body) made
    Constants, so that shape inference knows the sizes they determine; the model itself
    when there is nothing to fold."""
    b = Builder(info, set())
    nodes, changed = [], False
    for node in model.graph.node:
        new = node
        if node.op_type == "Shape" and node.domain in ("", "ai.onnx"):
            dims = info.dims.get(node.input[0]) if node.input[0] not in info.guessed else None
            if dims is not None and all(isinstance(d, int) for d in dims):
                attrs = {a.name: a.i for a in node.attribute}
                start, end = attrs.get("start", 0), attrs.get("end", len(dims))
                value = np.array(dims[slice(start, end if end != 0 or "end" in attrs else None)], np.int64)
                new = helper.make_node("Constant", [], [node.output[0]], name=node.name,
                                       value=numpy_helper.from_array(value))
                info.consts[node.output[0]] = value
        elif node.domain in ("", "ai.onnx"):
            new = _folded(b, node)
        changed |= new is not node
        nodes.append(new)
    if not changed:
        return model
    return with_nodes(model, nodes)


def _folded(b: Builder, node: NodeProto) -> NodeProto:
    """An unrolled node computing integers or booleans from constants (the iteration number
    and what is derived from it: slice bounds, counters, conditions) as a Constant, so that
    shape inference sees the sizes it determines."""
    if node.op_type == "Constant":
        value = _constant(node)
    elif node.op_type in _FOLDABLE and len(node.output) == 1 and all(i in b.info.consts for i in node.input if i):
        from onnx.reference import ReferenceEvaluator

        try:
            graph = helper.make_graph([node], "fold", [], [helper.make_empty_tensor_value_info(node.output[0])],
                                      initializer=[numpy_helper.from_array(np.asarray(b.info.consts[i]), i)
                                                   for i in node.input if i])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)])
            value = np.asarray(ReferenceEvaluator(model).run(None, {})[0])
        except Exception:  # leave it to the runtime
            return node
        if value.dtype.kind not in "iub":
            return node
        node = helper.make_node("Constant", [], [node.output[0]], name=node.name, value=numpy_helper.from_array(value))
    else:
        return node
    if value is not None:
        b.info.consts[node.output[0]] = value
    return node


def _rename_free(graph: GraphProto, names: dict[str, str]) -> None:
    """Rename, in place, the outer-scope names a nested subgraph uses (those it does not define)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        defined |= set(node.output)
    inner = {k: v for k, v in names.items() if k not in defined}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in inner:
                node.input[i] = inner[name]
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                _rename_free(g, inner)
    for o in graph.output:
        if o.name in inner:  # a subgraph output that is an outer tensor: pass it through
            tmp = inner[o.name]
            graph.node.append(helper.make_node("Identity", [tmp], [o.name]))


def _constant(node: NodeProto):
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
    return None


# --- values known before run time ---------------------------------------------------------
def _static_value(b: Builder, name: str) -> np.ndarray | None:
    """The value of tensor ``name`` if it depends on constants only (evaluated once with
    onnxruntime), else None."""
    if not name:
        return None
    if name in b.info.consts:
        return b.info.consts[name]
    produced = {o: node for node in b.nodes for o in node.output if o}
    cone, stack, inits, seen = [], [name], [], set()
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in b.info.consts:
            inits.append(numpy_helper.from_array(np.asarray(b.info.consts[t]), t))
            continue
        node = produced.get(t) or b.info.producers.get(t)
        if node is None or node.op_type.startswith("Random") or node.attribute and any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None  # a run-time input (or a subgraph, which this does not follow)
        cone.append(node)
        stack.extend(node.input)
    wanted, unique = {id(node) for node in cone}, []
    for node in list(b.info.producers.values()) + b.nodes:  # in topological order
        if id(node) in wanted:
            wanted.discard(id(node))
            unique.append(node)
    graph = helper.make_graph(unique, "static", [], [helper.make_empty_tensor_value_info(name)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)])
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        value = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {})[0]
    except Exception:  # not evaluable on its own: treat as a run-time value
        return None
    b.info.consts[name] = value
    return value


def _graph(n: Node, name: str) -> GraphProto:
    g = n.attr(name)
    if not isinstance(g, GraphProto):
        raise n.unsupported(f"has no '{name}' subgraph")
    return g


def _scalar_like(b: Builder, formal, value, dtype) -> str:
    """A constant bound to a subgraph input: its declared rank ([] or [1])."""
    shape = formal.type.tensor_type.shape
    rank = len(shape.dim) if formal.type.tensor_type.HasField("shape") else 0
    return b.const(np.full([1] * rank, value), dtype)


def _stack(b: Builder, parts: list[str], axis: int) -> str:
    """Tensors of one shape stacked along a new ``axis``."""
    return b.op("Concat", *[b.unsqueeze(p, [axis]) for p in parts], axis=axis)


# --- Loop ------------------------------------------------------------------------------------
@decompose("Loop")
def _expand_loop(b: Builder, n: Node) -> list:
    body = _graph(n, "body")
    carried = n.inputs[2:]
    k = len(carried)
    trip = _static_value(b, n.input(0)) if n.input(0) else None
    if n.input(0) and trip is None:
        raise n.unsupported("has a trip count known only at run time (jacli unrolls loops)")
    cond = n.input(1)
    alive = True if not cond else _static_value(b, cond)
    if alive is None:
        raise n.unsupported("has a loop condition known only at run time (jacli unrolls loops)")
    limit = int(np.asarray(trip).reshape(-1)[0]) if trip is not None else _MAX_ITERATIONS
    state, scans, count = list(carried), [], 0
    while count < limit and bool(np.asarray(alive).reshape(-1)[0]):
        bound = {body.input[0].name: _scalar_like(b, body.input[0], count, TensorProto.INT64),
                 body.input[1].name: _scalar_like(b, body.input[1], True, TensorProto.BOOL)}
        bound.update({formal.name: actual for formal, actual in zip(body.input[2:], state)})
        outs = _inline(b, body, bound)
        count += 1
        state, step_scans = outs[1:1 + k], outs[1 + k:]
        scans.append(step_scans)
        alive = _static_value(b, outs[0])
        if alive is None:
            raise n.unsupported("has a loop condition known only at run time (jacli unrolls loops)")
    if trip is None and count == _MAX_ITERATIONS:
        raise n.unsupported(f"runs more than {_MAX_ITERATIONS} iterations, more than jacli unrolls")
    scan_count = len(n.outputs) - k
    if scan_count and not scans:
        raise n.unsupported("runs no iteration but has scan outputs (of unknown shape)")
    stacked = [_stack(b, [s[j] for s in scans], 0) for j in range(scan_count)]
    return [b.op("Identity", v) for v in state] + stacked


# --- Scan ------------------------------------------------------------------------------------
@decompose("Scan")
def _expand_scan(b: Builder, n: Node) -> list:
    body = _graph(n, "body")
    m = n.attr("num_scan_inputs")
    states, xs = n.inputs[:len(n.inputs) - m], n.inputs[len(n.inputs) - m:]
    in_axes = list(n.attr("scan_input_axes") or [0] * m)
    in_dirs = list(n.attr("scan_input_directions") or [0] * m)
    scans_out = len(n.outputs) - len(states)
    out_axes = list(n.attr("scan_output_axes") or [0] * scans_out)
    out_dirs = list(n.attr("scan_output_directions") or [0] * scans_out)
    steps = None
    slices = []
    for x, axis, direction in zip(xs, in_axes, in_dirs):
        dims = b.dims(x)
        if dims is None or not isinstance(dims[axis % len(dims)], int):
            raise n.unsupported(f"scans '{x}' along an axis of a length known only at run time")
        axis %= len(dims)
        steps = dims[axis]
        pieces = [x] if steps == 1 else b.op("Split", x, b.ints([1] * steps), axis=axis, n_out=steps) \
            if b.opset >= 13 else b.op("Split", x, axis=axis, split=[1] * steps, n_out=steps)
        pieces = [b.squeeze(p, [axis]) for p in pieces]
        slices.append(pieces[::-1] if direction else pieces)
    state, outs_per_step = list(states), []
    for t in range(steps or 0):
        bound = {f.name: a for f, a in zip(body.input, state + [s[t] for s in slices])}
        outs = _inline(b, body, bound)
        state = outs[:len(states)]
        outs_per_step.append(outs[len(states):])
    results = [b.op("Identity", v) for v in state]
    for j in range(scans_out):
        parts = [o[j] for o in outs_per_step]
        if out_dirs[j]:
            parts = parts[::-1]
        results.append(_stack(b, parts, out_axes[j]))
    return results


# --- If ---------------------------------------------------------------------------------------
@decompose("If")
def _expand_if(b: Builder, n: Node) -> list:
    """An If whose condition is known before run time is its branch. Otherwise the node is
    kept (the returned None) and the If rules below differentiate it."""
    cond = _static_value(b, n.inputs[0])
    if cond is None:
        return None
    branch = _graph(n, "then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch")
    return [b.op("Identity", v) for v in _inline(b, branch, {})]


def _branch_model(b: Builder, n: Node, graph: GraphProto) -> onnx.ModelProto:
    """A branch as a model of its own: the outer tensors it uses are its inputs."""
    from ..graph import _subgraph_inputs

    holder = helper.make_node("If", [n.inputs[0]], [o.name for o in graph.output], then_branch=graph,
                              else_branch=graph)
    outer = sorted(_subgraph_inputs(holder) | set(n.implicit))
    inputs = [helper.make_tensor_value_info(x, b.info.types.get(x, TensorProto.FLOAT), b.info.dims.get(x))
              for x in outer]
    body = GraphProto()
    body.CopyFrom(graph)
    del body.input[:]
    body.input.extend(inputs)
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", b.opset)])


def _embedded(b: Builder, model: onnx.ModelProto, rename: dict[str, str], outputs: list[str]) -> GraphProto:
    """A derivative graph as an If branch: its inputs bound to outer tensors (``rename`` for
    the seeds, the same names for the rest), every name it defines made unique in the model."""
    prefix = b.fresh("branch")
    graph = model.graph
    defined = {t.name for t in graph.initializer} | {o for node in graph.node for o in node.output if o}
    names = {**{d: f"{prefix}/{d}" for d in defined}, **rename}
    out = GraphProto()
    out.name = prefix
    for t in graph.initializer:
        copy = TensorProto()
        copy.CopyFrom(t)
        copy.name = names[t.name]
        out.initializer.append(copy)
    for node in graph.node:
        new = NodeProto()
        new.CopyFrom(node)
        new.name = names.get(node.name, f"{prefix}/{node.name}")
        del new.input[:], new.output[:]
        new.input.extend(names.get(i, i) for i in node.input)
        new.output.extend(names.get(o, o) for o in node.output)
        for attr in new.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                _rename_free(g, names)
        out.node.append(new)
    for public, vi in zip(outputs, graph.output):
        out.node.append(helper.make_node("Identity", [names.get(vi.name, vi.name)], [public]))
        out.output.append(helper.make_value_info(public, vi.type))
    return out


def _float_outputs(b: Builder, n: Node, graph: GraphProto) -> list[int]:
    return [i for i, o in enumerate(graph.output) if o.type.tensor_type.elem_type in
            (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
            and n.outputs[i] and b.info.is_float(n.outputs[i])]


@vjp("If", inputs=(), implicit=True)
def _vjp_if(b, n, gs):
    from .. import derive

    outer = sorted(n.implicit)
    branches = {}
    for attr in ("then_branch", "else_branch"):
        graph = _graph(n, attr)
        of = [i for i in _float_outputs(b, n, graph) if gs[i] is not None]
        sub = _branch_model(b, n, graph)
        names = [graph.output[i].name for i in of]
        d = derive.build_vjp(sub, outer, names)
        seeds = {f"ct:{name}": gs[i] for i, name in zip(of, names)}
        branches[attr] = _embedded(b, d, seeds, [b.fresh(f"grad_{attr}") for _ in outer])
    grads = b.op("If", n.inputs[0], n_out=len(outer), **branches)
    grads = grads if len(outer) > 1 else [grads]
    return dict(zip(outer, grads))


@jvp("If", inputs=(), implicit=True)
def _jvp_if(b, n, ts):
    from .. import derive

    outer = sorted(n.implicit)
    results = None
    branches = {}
    for attr in ("then_branch", "else_branch"):
        graph = _graph(n, attr)
        of = _float_outputs(b, n, graph)
        sub = _branch_model(b, n, graph)
        d = derive.build_jvp(sub, outer, [graph.output[i].name for i in of])
        seeds = {f"tan:{x}": n.tangents[x] for x in outer}
        results = of
        branches[attr] = _embedded(b, d, seeds, [b.fresh(f"jvp_{attr}") for _ in of])
    outs = b.op("If", n.inputs[0], n_out=len(results), **branches)
    outs = outs if len(results) > 1 else [outs]
    tangents = [None] * len(n.outputs)
    for i, t in zip(results, outs):
        tangents[i] = t
    return tangents
