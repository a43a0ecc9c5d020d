"""Activation derivatives computed once per forward pass, not once per seed.

torch's backward kernels for GELU and SiLU take the activation's input and recompute its
derivative from it (``erf`` and ``exp``, ``tanh``, a sigmoid) for every element of the
cotangent. Batched over k seeds (``torch.func.vmap`` of one backward pass), that input is
expanded k times and the derivative recomputed k times, though it depends only on the
input. In what jacli differentiates in reverse mode, each such activation is rewritten
(``derivative_graph`` for TorchScript, ``rewrite_fx`` for ``torch.export`` programs) as

    y = act(x).detach() + (x - x.detach()) * act'(x.detach())

whose value is ``act(x)`` (plus an exact zero) and whose derivative is the multiplication
by ``act'(x)``, computed once in the forward pass: a 256 x 256 transformer block's Jacobian
of 16 samples 55 -> 46 ms as TorchScript, the Conv1d-GELU net's of 256 samples 30-41 ->
20-22 ms (1 thread, the allocator tuned; docs/performance.md). Only reverse-mode calls
(VJPs, and the double-VJP route to JVPs) run it: in autograd's backward pass the rewrite's
add and sub hand the cotangent on untouched, while forward-mode AD would take three passes
over the k tangents (sub, mul, add) where torch's formula takes one. Plain forward passes
(outputs, finite differences, the float64 reference) and forward mode run the model's own
graph. Where the activation's input is not finite the rewritten value is NaN (inf - inf),
where no derivative is defined anyway.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch
from torch import Tensor

from .torchscript import nodes


# (the constants are written out: TorchScript compiles these functions and takes no globals)
def gelu_erf(x: Tensor) -> Tensor:
    xd = x.detach()
    d = 0.5 * (1.0 + torch.erf(xd * 0.7071067811865476)) + xd * torch.exp(-0.5 * xd * xd) * 0.3989422804014327
    return torch.nn.functional.gelu(x).detach() + (x - xd) * d


def gelu_tanh(x: Tensor) -> Tensor:
    xd = x.detach()
    t = torch.tanh(0.7978845608028654 * (xd + 0.044715 * xd * xd * xd))  # sqrt(2 / pi)
    d = 0.5 * (1.0 + t) + 0.5 * xd * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * xd * xd)
    return torch.nn.functional.gelu(x, approximate="tanh").detach() + (x - xd) * d


def silu(x: Tensor) -> Tensor:
    xd = x.detach()
    s = torch.sigmoid(xd)
    d = s * (1.0 + xd * (1.0 - s))
    return torch.nn.functional.silu(x).detach() + (x - xd) * d


# (TorchScript operator, its ``approximate`` argument or None) -> the rewrite
_SCRIPT = {("aten::gelu", "none"): gelu_erf, ("aten::gelu", "tanh"): gelu_tanh, ("aten::silu", None): silu}
_scripted: dict = {}


def derivative_graph(module):
    """A callable ``f(module, *tensors)`` running a TorchScript module's forward graph with
    its GELU and SiLU activations rewritten, or None where it has none. The graph is a copy
    (``inlined_graph``: submodules' calls inlined); its constants are the module's own tensors."""
    graph = module.inlined_graph
    found = [n for n in nodes(graph) if _script_key(n) in _SCRIPT]
    if not found:
        return None
    for node in found:
        key = _script_key(node)
        if key not in _scripted:
            _scripted[key] = torch.jit.script(_SCRIPT[key]).graph
        with graph.insert_point_guard(node):
            value = graph.insertGraph(_scripted[key], [node.inputsAt(0)])[0]
        node.output().replaceAllUsesWith(value)
        node.destroy()
    return torch._C._create_function_from_graph("forward", graph)


def _script_key(node):
    kind = node.kind()
    if kind == "aten::silu":
        return kind, None
    if kind != "aten::gelu":
        return None
    source = node.inputsAt(1).node() if node.inputsSize() > 1 else None
    if source is None or source.kind() != "prim::Constant" or not source.hasAttribute("value"):
        return None
    return kind, source.s("value") if source.kindOf("value") == "s" else None


ORIGINAL = "jacli_original_target"  # fx node meta: the operator a rewritten call stands for
_ACTIVE = contextvars.ContextVar("jacli_torch_once", default=False)


@contextmanager
def differentiating():
    """Within it, the fx graphs ``rewrite_fx`` rewrote take their activations' derivatives
    once; outside it, they call the operators as recorded."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _fx_gelu(x, approximate="none"):
    if not _ACTIVE.get():
        return torch.ops.aten.gelu.default(x, approximate=approximate)
    return gelu_tanh(x) if approximate == "tanh" else gelu_erf(x)


def _fx_silu(x):
    return silu(x) if _ACTIVE.get() else torch.ops.aten.silu.default(x)


def rewrite_fx(module) -> bool:
    """In place, in an fx GraphModule (a ``torch.export`` program's ``module()``, whose input
    checks a copy would lose): its GELU and SiLU calls become calls that, ``differentiating``,
    take the derivative once, and otherwise call the same operator. Whether any was found."""
    aten = torch.ops.aten
    targets = {aten.gelu.default: _fx_gelu, aten.silu.default: _fx_silu}
    found = False
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target in targets and isinstance(node.args[0], torch.fx.Node):
            approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            if node.target is aten.silu.default or approximate in ("none", "tanh"):
                node.meta[ORIGINAL] = node.target  # the operator's name, for diff --locate
                node.target, found = targets[node.target], True
    if found:
        module.recompile()
    return found
