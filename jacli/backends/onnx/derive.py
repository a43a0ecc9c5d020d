"""Exact derivatives of ONNX models by graph transformation.

ONNX runtimes evaluate graphs but cannot differentiate them. This module rewrites an
``onnx.ModelProto`` into derivative graphs that are themselves plain ONNX models, run by
onnxruntime (CPU) like any other:

* :func:`build_vjp` (reverse mode): inputs are the original inputs plus a cotangent
  ``ct:<y>`` per output ``y`` in ``of``; outputs are ``grad:<x>`` for each ``x`` in ``wrt``.
* :func:`build_jvp` (forward mode): inputs are the original inputs plus a tangent
  ``tan:<x>`` per ``x`` in ``wrt``; outputs are ``jvp:<y>`` for each ``y`` in ``of``.

How the graphs are built. An activity analysis marks the tensors that depend on ``wrt``
*and* influence ``of``; only nodes touching them are differentiated, everything else
(shape plumbing, constant branches) is kept as forward computation. The original nodes
are kept (they provide the primal values the rules need; a MaxPool may be asked for its
Indices output as well), then the derivative nodes are appended: in reverse topological
order with cotangents summed per tensor (VJP), or in topological order (JVP); finally
everything the requested outputs do not need is pruned. Each operator has one VJP rule in
``VJP_RULES`` and one JVP rule in ``JVP_RULES`` (``rules/``); a rule emits ordinary ONNX nodes through
:class:`~.graph.Builder`, which folds shapes that shape inference knows statically and computes
the rest at run time with ``Shape``/``Slice``/``Concat``, so a dynamic batch axis (or
dynamic spatial axes) stays dynamic. Emitted nodes use the form of each operator that
the model's opset defines (e.g. ``ReduceSum`` axes as an attribute before opset 13).

Operators with integer/bool outputs (``Shape``, ``ArgMax``, comparisons, ...) are listed
explicitly in ``NON_DIFFERENTIABLE``; piecewise-constant float operators (``Floor``,
``Sign``, ...) in ``PIECEWISE_CONSTANT`` (zero derivative almost everywhere, as in
PyTorch). Operators with rules differentiate their float outputs only (a ``Cast`` to an
integer type, MaxPool's ``Indices``, Dropout's ``mask`` carry no derivative). Any other
operator on the active path, and any input/output a rule does not cover (listed in
``_DIFF_INPUTS``/``_DIFF_OUTPUTS``, e.g. Conv weights), raises
:class:`~jacli.errors.UnsupportedError`; nothing is silently zero.

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
from .graph import Builder, Info, Node, _node_inputs, _prepare, _subgraph_inputs
from .rules import JVP_RULES, NON_DIFFERENTIABLE, PIECEWISE_CONSTANT, VJP_RULES, _DIFF_INPUTS, _DIFF_OUTPUTS

# =====================================================================================
# Drivers
# =====================================================================================
def _active_nodes(model: onnx.ModelProto, info: Info, wrt: Sequence[str], of: Sequence[str]) -> list[Node]:
    """Nodes on a path from ``wrt`` to ``of`` (in topological order), each checked to have a
    rule for the inputs/outputs it is differentiated along."""
    nodes = list(model.graph.node)
    varied = set(wrt)
    for node in nodes:
        if not any(i in varied for i in _node_inputs(node)):
            continue
        if node.op_type in NON_DIFFERENTIABLE or node.op_type in PIECEWISE_CONSTANT:
            continue
        if node.op_type in VJP_RULES and node.domain in ("", "ai.onnx"):
            varied |= {o for o in node.output if o and info.is_float(o)}
        else:
            varied |= {o for o in node.output if o}  # unknown op: treat all outputs as dependent
    useful = set(of)
    for node in reversed(nodes):
        if any(o in useful for o in node.output):
            useful |= set(_node_inputs(node))
    active = varied & useful
    result = []
    for index, node in enumerate(nodes):
        if not any(o in active for o in node.output):
            continue
        act_in = frozenset(i for i, name in enumerate(node.input) if name in active)
        implicit = _subgraph_inputs(node) & active
        if not act_in and not implicit:
            continue
        n = Node(node, index, info, act_in)
        if node.domain not in ("", "ai.onnx") or node.op_type not in VJP_RULES or implicit:
            raise n.unsupported()
        bad_in = sorted(act_in - set(_DIFF_INPUTS.get(n.op_type, act_in)))
        if bad_in:
            raise n.unsupported(f"has no derivative rule with respect to its input {bad_in[0]} "
                                f"('{node.input[bad_in[0]]}')")
        allowed_out = _DIFF_OUTPUTS.get(n.op_type, range(len(node.output)))
        bad_out = [i for i, o in enumerate(node.output) if o in active and i not in allowed_out]
        if bad_out:
            raise n.unsupported(f"has no derivative rule for its output {bad_out[0]} ('{node.output[bad_out[0]]}')")
        result.append(n)
    return result


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
    new.input.extend(extra_inputs)
    new.output.extend(result_types)
    produced = {o for node in kept for o in node.output}
    new.value_info.extend(vi for vi in graph.value_info if vi.name in produced)
    return out


def _start(model: onnx.ModelProto, wrt: Sequence[str], of: Sequence[str]):
    model = _prepare(model)
    info = Info(model)
    _check_request(info, wrt, of)
    taken = {vi.name for vi in itertools.chain(model.graph.input, model.graph.output, model.graph.value_info)}
    taken |= {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        taken |= set(node.input) | set(node.output) | {node.name}
    for name in [f"ct:{y}" for y in of] + [f"grad:{x}" for x in wrt] + [f"tan:{x}" for x in wrt] + [
        f"jvp:{y}" for y in of
    ]:
        if name in taken:
            raise UnsupportedError(f"the model already uses the name '{name}' that jacli gives a derivative")
    return model, info, Builder(info, taken), _active_nodes(model, info, wrt, of)


def build_vjp(model: onnx.ModelProto, wrt: list[str], of: list[str]) -> onnx.ModelProto:
    """Reverse-mode derivative graph: original inputs + ``ct:<y>`` per ``y`` in ``of``
    (shaped like y) -> ``grad:<x>`` per ``x`` in ``wrt`` (shaped like x)."""
    model, info, b, nodes = _start(model, wrt, of)
    cts: dict[str, list[str]] = defaultdict(list)
    for y in of:
        cts[y].append(f"ct:{y}")
    for n in reversed(nodes):
        b.scope = f"vjp/{n.name}"
        gs = [b.add(*cts.pop(o)) if o in cts else None for o in n.outputs]
        if all(g is None for g in gs):
            continue
        grads = VJP_RULES[n.op_type](b, n, gs)
        missing = n.active - set(grads)
        if missing:
            raise AssertionError(f"VJP rule of {n.op_type} gave no cotangent for inputs {sorted(missing)}")
        for i, g in grads.items():
            cts[n.inputs[i]].append(g)
    b.scope = "vjp"
    results = {}
    for x in wrt:
        results[f"grad:{x}"] = b.add(*cts[x]) if cts.get(x) else b.zeros_like(x, info.types[x])
    extra = [_like(info, y, f"ct:{y}") for y in of]
    types = [_like(info, x, f"grad:{x}") for x in wrt]
    return _assemble(model, b, extra, results, types)


def build_jvp(model: onnx.ModelProto, wrt: list[str], of: list[str]) -> onnx.ModelProto:
    """Forward-mode derivative graph: original inputs + ``tan:<x>`` per ``x`` in ``wrt``
    (shaped like x) -> ``jvp:<y>`` per ``y`` in ``of`` (shaped like y)."""
    model, info, b, nodes = _start(model, wrt, of)
    tangents = {x: f"tan:{x}" for x in wrt}
    for n in nodes:
        b.scope = f"jvp/{n.name}"
        ts = [tangents.get(name) if i in n.active else None for i, name in enumerate(n.inputs)]
        outs = JVP_RULES[n.op_type](b, n, ts)
        for o, t in zip(n.outputs, outs):
            if t is not None:
                tangents[o] = t
    b.scope = "jvp"
    results = {}
    for y in of:
        results[f"jvp:{y}"] = tangents.get(y) or b.zeros_like(y, info.types[y])
    extra = [_like(info, x, f"tan:{x}") for x in wrt]
    types = [_like(info, y, f"jvp:{y}") for y in of]
    return _assemble(model, b, extra, results, types)
