"""``torch.export`` programs: ``.pt2`` archives written by ``torch.export.save``.

``torch.export.load`` gives an ExportedProgram; its ``module()`` (an fx GraphModule) is run
by the TorchScript backend's ``TorchModel``, so derivatives come the same way (VJPs by
``torch.autograd.grad``, JVPs by forward-mode AD, float64 from a ``.double()`` copy). Unlike
TorchScript, a program records its signature: input and output names, per-sample shapes
(a dynamic ``torch.export.Dim`` is None; a fixed batch size is kept, and the engine calls the
program in pieces of that size) and dtypes.

Loading a ``.pt2`` can run code (pickles, shape expressions evaluated as Python, code that
torch generates from names in the archive); without ``--trust-model`` the archive's bytes are
checked first (``torch_checks.torch_export_problems``) and those same bytes are loaded.
"""
from __future__ import annotations

import io
import logging
from contextlib import contextmanager

from .. import limits
from ..errors import ModelLoadError, UnsupportedError
from ..model import TensorSpec
from ._common import require, short
from .torchscript import TorchModel, freeze

# Higher-order operators that torch's forward-mode AD goes through; out of any other
# (torch.cond, while_loop, map, scan, ...) its tangents come empty, without an error.
_FORWARD_AD_THROUGH = {"wrap_with_set_grad_enabled", "wrap_with_autocast"}


def load(path: str, trust: bool = False) -> "ExportedModel":
    torch = require("torch", "torch", "torch", "torch.export")
    data = limits.read_regular(path, "model", ModelLoadError)  # read once: what is checked is what is loaded
    if not trust:
        from .refusal import refuse
        from .torch_checks import torch_export_problems

        refuse(path, torch_export_problems(path, data))
    with _quiet():
        try:
            program = torch.export.load(io.BytesIO(data))
            module = program.module()
        except Exception as e:
            raise ModelLoadError(f"cannot load torch.export program {path}: {short(e)} (truncated or corrupt?)") \
                from None
    return ExportedModel.wrap_program(program, module, path)


class ExportedModel(TorchModel):
    """An exported program's ``module()``, called with the program's own argument structure
    and giving outputs the names the program records."""

    @classmethod
    def wrap_program(cls, program, module, path: str) -> "ExportedModel":
        freeze(module)  # module() is already in the mode it was exported in (eval() is not allowed)
        m = cls(path=path, format="torch-export", backend="torch", supports_float64=True)
        m.module, m.in_spec = module, program.call_spec.in_spec
        nodes = {n.name: n for n in program.graph.nodes}
        signature = program.graph_signature
        m.inputs = [_spec(name, nodes, "input") for name in signature.user_inputs]
        m.outputs = [_spec(name, nodes, "output") for name in signature.user_outputs]
        m.no_forward_ad = sorted(_higher_order_operators(module) - _FORWARD_AD_THROUGH)
        return m

    def bind(self, xs) -> None:
        """Nothing to learn: the program records its signature."""

    def _run(self, tensors):
        args, kwargs = self.in_spec.unflatten(list(tensors))
        return self.module(*args, **kwargs)

    def _jvp(self, xs, ts, of):
        if self.no_forward_ad:  # the double-VJP fallback does not help: these have no double backward
            raise UnsupportedError(
                f"forward mode: torch's forward-mode AD gives no tangents through {', '.join(self.no_forward_ad)} "
                "(torch.ops.higher_order) in this program; use --mode reverse"
            )
        return super()._jvp(xs, ts, of)

    def _named(self, out):
        import torch.utils._pytree as pytree

        return [s.name for s in self.outputs], pytree.tree_leaves(out)

    def _float64_copy(self):
        """Parameters and buffers in float64, and the graph's own floating-point dtype
        arguments too (an LSTM's initial state, casts), which export records explicitly."""
        import torch
        from torch.fx.node import map_aggregate

        def float64(value):
            return torch.float64 if isinstance(value, torch.dtype) and value.is_floating_point else value

        module = super()._float64_copy()
        for graph_module in module.modules():  # subgraphs of cond, while_loop, ... too
            if isinstance(graph_module, torch.fx.GraphModule):
                for node in graph_module.graph.nodes:
                    node.args, node.kwargs = map_aggregate(node.args, float64), map_aggregate(node.kwargs, float64)
                graph_module.recompile()
        return module


def _higher_order_operators(module) -> set[str]:
    """Names of the higher-order operators (control flow, wrappers) the module calls, in
    subgraphs too."""
    import torch

    return {node.target.name() for graph_module in module.modules() if isinstance(graph_module, torch.fx.GraphModule)
            for node in graph_module.graph.nodes if isinstance(node.target, torch._ops.HigherOrderOperator)}


def _spec(name, nodes: dict, kind: str) -> TensorSpec:
    """A user input or output from its node's example value: symbolic dimensions are None."""
    import torch

    value = nodes[name].meta.get("val") if isinstance(name, str) and name in nodes else None
    if not isinstance(value, torch.Tensor):
        raise ModelLoadError(f"the program's {kind} {name!r} is not a tensor; jacli differentiates tensors only")
    shape = tuple(d if isinstance(d, int) else None for d in value.shape)
    return TensorSpec(name, shape, str(value.dtype).replace("torch.", ""))


@contextmanager
def _quiet():
    """torch.export logs warnings (tracebacks included) to stderr while it loads; jacli
    reports a failure as one line instead."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
