"""Exact derivatives of ONNX models by graph transformation.

ONNX runtimes evaluate graphs but cannot differentiate them. This module rewrites an
``onnx.ModelProto`` into derivative graphs that are themselves plain ONNX models, run by
onnxruntime (CPU) like any other:

* :func:`build_vjp` (reverse mode): inputs are the original inputs plus a cotangent
  ``ct:<y>`` per output ``y`` in ``of``; outputs are ``grad:<x>`` for each ``x`` in ``wrt``.
* :func:`build_jvp` (forward mode): inputs are the original inputs plus a tangent
  ``tan:<x>`` per ``x`` in ``wrt``; outputs are ``jvp:<y>`` for each ``y`` in ``of``.

With ``tiled=True`` either takes seeds (and gives results) of k*B rows for the B samples
and runs the forward part once for all k (module ``tiled``).

How the graphs are built. An activity analysis marks the tensors that depend on ``wrt``
*and* influence ``of``; only nodes touching them are differentiated, everything else
(shape plumbing, constant branches) is kept as forward computation. The original nodes
are kept (they provide the primal values the rules need; a MaxPool may be asked for its
Indices output as well), then the derivative nodes are appended: in reverse topological
order with cotangents summed per tensor (VJP), or in topological order (JVP); finally
everything the requested outputs do not need is pruned. The rules come from the registry
(``rules.registry``): for each node, the entries serving its operator at the model's opset,
each called for the active inputs it covers (contributions summed). A rule emits ordinary
ONNX nodes through :class:`~.graph.Builder`, which folds shapes that shape inference knows
statically and computes the rest at run time with ``Shape``/``Slice``/``Concat``, so a
dynamic batch axis (or dynamic spatial axes) stays dynamic. Emitted nodes use the form of
each operator that the model's opset defines (e.g. ``ReduceSum`` axes as an attribute
before opset 13).

Operators with integer/bool outputs (``Shape``, ``ArgMax``, comparisons, ...) and
piecewise-constant float operators (``Floor``, ``Sign``, ...) are registry entries of kind
``zero``/``piecewise`` (zero derivative almost everywhere, as in PyTorch). Operators with
rules differentiate their float outputs only (a ``Cast`` to an integer type, MaxPool's
``Indices``, Dropout's ``mask`` carry no derivative). Any other operator on the active path,
and any input/output no entry covers (e.g. BatchNormalization's running mean), raises
:class:`~jacli.errors.UnsupportedError` naming the option that works (``--wrt`` leaving
that input out, or ``--method fd``); nothing is silently zero.

Conventions at points where the derivative is not defined (chosen to match PyTorch):
``Relu``/``LeakyRelu``/``PRelu``/``Elu``/``Selu`` use the negative branch at 0, ``Abs`` has
derivative 0 at 0, ``Clip`` passes the derivative at its bounds (inclusive), ``ReduceL2``
has derivative 0 at zero norm. ``MaxPool`` sends the derivative to the *first* maximum of
each window in row-major kernel order (the element onnxruntime's forward pass and
``torch.nn.functional.max_pool*d`` select); ``Max``/``Min``/``ReduceMax``/``ReduceMin``/
``GlobalMaxPool`` split it evenly among tied elements (as ``torch.maximum``/``torch.amax``).
VJP and JVP use the same choice, so rows and columns of a Jacobian agree everywhere.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Sequence

import onnx
from onnx import helper

from ...errors import InputError, UnsupportedError
from .graph import Builder, Info, Node, _node_inputs, _prepare, _subgraph_inputs, with_nodes
from .rules import lookup
from .rules.control import fold_shapes
from .tiled import rename_batch, seed_axis, tile

# =====================================================================================
# Drivers
# =====================================================================================
def _active_nodes(model: onnx.ModelProto, info: Info, wrt: Sequence[str], of: Sequence[str],
                  mode: str) -> list[Node]:
    """Nodes on a path from ``wrt`` to ``of`` (in topological order), each given the registry
    entries (``n.parts``: (entry, active inputs it covers)) that differentiate it in ``mode``."""
    nodes = list(model.graph.node)
    varied = set(wrt)
    for node in nodes:
        if not any(i in varied for i in _node_inputs(node)):
            continue
        found = lookup(node.op_type, info.opset, node.domain)
        if found and all(e.kind != "rule" for e in found):
            continue  # zero derivative by definition
        if found:
            varied |= {o for o in node.output if o and info.is_float(o)}
        else:
            varied |= {o for o in node.output if o}  # unknown op: treat all outputs as dependent
    useful = set(of)
    for node in reversed(nodes):
        if any(o in useful for o in node.output):
            useful |= set(_node_inputs(node))
    active = varied & useful
    result, uncovered = [], []
    for index, node in enumerate(nodes):
        if not any(o in active for o in node.output):
            continue
        act_in = frozenset(i for i, name in enumerate(node.input) if name in active)
        implicit = _subgraph_inputs(node) & active
        entries = lookup(node.op_type, info.opset, node.domain)
        act_in -= {i for e in entries if e.kind != "rule" and e.inputs is not None for i in e.inputs}
        if not act_in and not implicit:
            continue  # none, or only inputs whose derivative is zero by definition
        n = Node(node, index, info, act_in)
        found = [e for e in entries if e.kind == "rule" and getattr(e, mode) is not None]
        if not found or (implicit and not any(e.implicit for e in found)):
            raise n.unsupported()
        parts: dict[int, set[int]] = defaultdict(set)
        for i in sorted(act_in):
            owner = next((k for k, e in enumerate(found) if e.covers(i)), None)
            if owner is None:
                uncovered.append((n, i))
            else:
                parts[owner].add(i)
        if implicit and not parts:
            parts[next(k for k, e in enumerate(found) if e.implicit)] = set()
        if not parts:
            continue  # only inputs without a rule: reported below
        bad_out = [i for i, o in enumerate(node.output) if o in active
                   and not any(e.outputs is None or i in e.outputs for k, e in enumerate(found) if k in parts)]
        if bad_out:
            raise n.unsupported(f"has no derivative rule for its output {bad_out[0]} ('{node.output[bad_out[0]]}')",
                                hint=f"leave it out with --of (outputs: {', '.join(of)})" if len(of) > 1 else None)
        n.parts = [(found[k], frozenset(ins)) for k, ins in sorted(parts.items())]
        n.implicit = frozenset(implicit)
        result.append(n)
    if uncovered:
        n, i = uncovered[0]
        raise n.unsupported(f"has no derivative rule with respect to its input {i} ('{n.inputs[i]}')",
                            hint=_leave_out_hint(nodes, wrt, [m.inputs[j] for m, j in uncovered]))
    return result


def _leave_out_hint(nodes: list, wrt: Sequence[str], tensors: list[str]) -> str | None:
    """``--wrt`` naming the inputs none of ``tensors`` depends on, when there are any."""
    frontier = set(tensors)
    for node in reversed(nodes):
        if frontier & set(node.output):
            frontier |= set(_node_inputs(node))
    sources = [x for x in wrt if x in frontier]
    others = [x for x in wrt if x not in sources]
    if not others:
        return None
    return f"differentiate with respect to the other inputs only with --wrt {','.join(others)}"


def _check_request(info: Info, wrt: Sequence[str], of: Sequence[str]) -> None:
    for name in wrt:
        if name not in info.inputs:
            raise InputError(f"'{name}' is not an input of the model (inputs: {', '.join(info.inputs)})")
        if not info.is_float(name):
            raise InputError(f"input '{name}' is not a floating-point tensor; it has no derivative")
    for name in of:
        if name not in info.outputs:
            raise InputError(f"'{name}' is not an output of the model (outputs: {', '.join(info.outputs)})")
        if not info.is_float(name):
            raise InputError(f"output '{name}' is not a floating-point tensor; it has no derivative")


def _like(info: Info, source: str, name: str) -> onnx.ValueInfoProto:
    """Value info for ``name`` with the type and (inferred) shape of tensor ``source``."""
    return helper.make_tensor_value_info(name, info.types[source], info.dims.get(source))


def _assemble(model: onnx.ModelProto, b: Builder, extra_inputs: list, results: dict[str, str],
              result_types: list) -> onnx.ModelProto:
    """Forward nodes + derivative nodes + Identity to the public output names, pruned to
    what the outputs need."""
    graph = model.graph
    for public, internal in results.items():
        b.nodes.append(helper.make_node("Identity", [internal], [public], name=b.fresh("output")))
    nodes = list(graph.node) + b.nodes
    needed = set(results)
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed |= set(_node_inputs(node))
    kept.reverse()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    new = out.graph
    del new.node[:], new.initializer[:], new.output[:], new.value_info[:]
    new.node.extend(kept)
    new.initializer.extend(t for t in list(graph.initializer) + b.initializers if t.name in needed)
    # graph inputs backed by an initializer (IR < 4 style) are optional inputs with a default:
    # they go where their initializer goes, so an unused one is not left as a required input
    defaults = {t.name for t in graph.initializer}
    inputs = [vi for vi in graph.input if vi.name not in defaults or vi.name in needed]
    del new.input[:]
    new.input.extend(inputs + extra_inputs + [vi for name, vi in b.inputs.items() if name in needed])
    new.output.extend(result_types)
    produced = {o for node in kept for o in node.output}
    new.value_info.extend(vi for vi in graph.value_info if vi.name in produced)
    return out


_NESTING = 8  # rounds of decomposition: the depth of nested control flow jacli unrolls


def _decomposed(model: onnx.ModelProto, info: Info, wrt: Sequence[str], of: Sequence[str]) -> onnx.ModelProto:
    """The model with every node on the path from ``wrt`` to ``of`` whose registry entry is a
    decomposition (``expand``) replaced by the operators it decomposes into (the model itself
    when there is none)."""
    nodes = list(model.graph.node)
    opset = info.opset
    expanding = {}
    for index, node in enumerate(nodes):
        found = [e for e in lookup(node.op_type, opset, node.domain) if e.expand is not None]
        if found:
            expanding[index] = found[0]
    if not expanding:
        return model
    varied, useful = set(wrt), set(of)
    for node in nodes:
        if any(i in varied for i in _node_inputs(node)):
            varied |= {o for o in node.output if o}
    for node in reversed(nodes):
        if any(o in useful for o in node.output):
            useful |= set(_node_inputs(node))
    taken = {t.name for t in model.graph.initializer} | {vi.name for vi in model.graph.input}
    for node in nodes:
        taken |= set(node.input) | set(node.output) | {node.name}
    b = Builder(info, taken)
    spliced, changed = [], False
    for index, node in enumerate(nodes):
        entry = expanding.get(index)
        active = frozenset(i for i, name in enumerate(node.input) if name in varied)
        if entry is None or not set(_node_inputs(node)) & varied or not any(o in useful for o in node.output):
            spliced.append(node)
            continue
        n = Node(node, index, info, active)
        b.scope = f"expand/{n.name}"
        start = len(b.nodes)
        outs = entry.expand(b, n)
        if outs is None:  # the decomposition does not apply here: the node's own rules do
            del b.nodes[start:]
            spliced.append(node)
            continue
        changed = True
        for public, internal in zip(node.output, outs):
            if public and internal is not None:
                b.op("Identity", internal)
                b.nodes[-1].output[0] = public
        spliced += b.nodes[start:]
    if not changed:
        return model
    return with_nodes(model, spliced, b.initializers)


def decomposed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every operator that has a decomposition (recurrent networks, control
    flow, attention) rewritten into the operators it is made of: the same function, e.g.
    for onnxruntime kernels that exist in float64 when the operator's own does not."""
    model = _prepare(model)
    info = Info(model)
    return _expanded(model, info, list(info.inputs), list(info.outputs))[0]


def _expanded(model: onnx.ModelProto, info: Info, wrt, of) -> tuple[onnx.ModelProto, Info]:
    """Decompositions substituted (and the sizes they compute folded), round after round."""
    for _ in range(_NESTING):  # a decomposition may bring nodes that decompose (a Loop inside a Loop)
        expanded = _decomposed(model, info, wrt, of)
        if expanded is model:
            break
        model, info = expanded, Info(expanded)
        folded = fold_shapes(model, info)  # sizes a decomposition computes at run time, known
        if folded is not model:
            model, info = folded, Info(folded)
    return model, info


def _pin(model: onnx.ModelProto, fixed: dict | None) -> None:
    """Set the dims in ``fixed`` (input -> dims, None keeps one dynamic) on the model's inputs."""
    for vi in model.graph.input:
        dims = (fixed or {}).get(vi.name)
        if dims is None or not vi.type.tensor_type.HasField("shape"):
            continue
        for proto, value in zip(vi.type.tensor_type.shape.dim, dims):
            if value is not None:
                proto.Clear()
                proto.dim_value = int(value)


def _start(model: onnx.ModelProto, wrt: Sequence[str], of: Sequence[str], mode: str, fixed: dict | None = None,
           tiled: bool = False, weights=frozenset()):
    model = _prepare(model)
    _pin(model, fixed)
    if tiled:
        rename_batch(model, weights)
        del model.graph.value_info[:]  # shapes a file records hold its batch size, not the symbol
    info = Info(model)
    _check_request(info, wrt, of)
    model, info = _expanded(model, info, wrt, of)
    info.fed = frozenset(weights) & set(info.inputs)
    taken = {vi.name for vi in itertools.chain(model.graph.input, model.graph.output, model.graph.value_info)}
    taken |= {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        taken |= set(node.input) | set(node.output) | {node.name}
    for name in [f"ct:{y}" for y in of] + [f"grad:{x}" for x in wrt] + [f"tan:{x}" for x in wrt] + [
        f"jvp:{y}" for y in of
    ]:
        if name in taken:
            raise UnsupportedError(f"the model already uses the name '{name}' that jacli gives a derivative")
    return model, info, Builder(info, taken), _active_nodes(model, info, wrt, of, mode)


def build_vjp(model: onnx.ModelProto, wrt: list[str], of: list[str], fixed: dict | None = None,
              tiled: bool = False, weights=frozenset()) -> onnx.ModelProto:
    """Reverse-mode derivative graph: original inputs + ``ct:<y>`` per ``y`` in ``of``
    (shaped like y) -> ``grad:<x>`` per ``x`` in ``wrt`` (shaped like x). ``fixed`` pins
    dynamic input dims (the graph then serves inputs of those sizes only). ``tiled``: the
    cotangents and gradients hold k*B rows for the B samples, k seeds each, and the
    forward part runs once (module ``tiled``); ``weights``: graph inputs that hold the
    model's weights, not samples (what ``tiled`` must not tile)."""
    model, info, b, nodes = _start(model, wrt, of, "vjp", fixed, tiled, weights)
    cts: dict[str, list[str]] = defaultdict(list)
    for y in of:
        cts[y].append(f"ct:{y}")
    for n in reversed(nodes):
        b.scope = f"vjp/{n.name}"
        gs = [b.add(*cts.pop(o)) if o in cts else None for o in n.outputs]
        if all(g is None for g in gs):
            continue
        for entry, part in n.parts:
            grads = entry.vjp(b, n.restricted(part), gs)
            missing = part - set(grads)
            if missing:
                raise AssertionError(f"VJP rule of {n.op_type} gave no cotangent for inputs {sorted(missing)}")
            for i, g in grads.items():
                if isinstance(i, int):
                    cts[n.inputs[i]].append(g)
                else:  # an outer-scope tensor a subgraph uses (control flow)
                    cts[i].append(g)
    b.scope = "vjp"
    results = {}
    for x in wrt:
        results[f"grad:{x}"] = b.add(*cts[x]) if cts.get(x) else b.zeros_like(x, info.types[x])
    extra = [_like(info, y, f"ct:{y}") for y in of]
    types = [_like(info, x, f"grad:{x}") for x in wrt]
    if tiled:
        results = tile(model, info, b, results, [_like(info, y, f"ct:{y}") for y in of], weights)
        extra, types = [seed_axis(v) for v in extra], [seed_axis(v) for v in types]
    return _assemble(model, b, extra, results, types)


def build_jvp(model: onnx.ModelProto, wrt: list[str], of: list[str], fixed: dict | None = None,
              tiled: bool = False, weights=frozenset()) -> onnx.ModelProto:
    """Forward-mode derivative graph: original inputs + ``tan:<x>`` per ``x`` in ``wrt``
    (shaped like x) -> ``jvp:<y>`` per ``y`` in ``of`` (shaped like y); ``fixed`` and
    ``tiled`` (tangents and results of k*B rows) as for :func:`build_vjp`."""
    model, info, b, nodes = _start(model, wrt, of, "jvp", fixed, tiled, weights)
    tangents = {x: f"tan:{x}" for x in wrt}
    for n in nodes:
        b.scope = f"jvp/{n.name}"
        total: list = [None] * len(n.outputs)
        for entry, part in n.parts:
            ts = [tangents.get(name) if i in part else None for i, name in enumerate(n.inputs)]
            outs = list(entry.jvp(b, n.restricted(part, tangents), ts))
            outs += [None] * (len(n.outputs) - len(outs))
            total = [b.add(a, t) for a, t in zip(total, outs)]
        for o, t in zip(n.outputs, total):
            if t is not None:
                tangents[o] = t
    b.scope = "jvp"
    results = {}
    for y in of:
        results[f"jvp:{y}"] = tangents.get(y) or b.zeros_like(y, info.types[y])
    extra = [_like(info, x, f"tan:{x}") for x in wrt]
    types = [_like(info, y, f"jvp:{y}") for y in of]
    if tiled:
        results = tile(model, info, b, results, [_like(info, x, f"tan:{x}") for x in wrt], weights)
        extra, types = [seed_axis(v) for v in extra], [seed_axis(v) for v in types]
    return _assemble(model, b, extra, results, types)
