"""Intermediate tensors of a ``torch.export`` program and their directional derivatives,
for ``jacli diff --locate``: the program's graph run by an fx ``Interpreter`` on dual
tensors (forward-mode AD), recording the value and tangent of every floating-point node
output. Tensors are named by the graph's node names (``conv2d``, ``tanh``, ``linear``),
which the dynamo ONNX exporter (``torch.onnx.export(..., dynamo=True)``) keeps for the
tensors it emits, so a program and its ONNX export can be compared tensor by tensor."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..errors import InputError, UnsupportedError
from ._common import short


def probe(model, xs: Mapping[str, np.ndarray], tangents: Mapping[str, np.ndarray]):
    """(order, values, J·v) of the program's float node outputs at ``xs`` for the tangents
    (one per differentiated input): ``order`` lists {tensor, node, op_type} in graph order."""
    import torch
    from torch.autograd import forward_ad

    from .torch_once import ORIGINAL

    if model.no_forward_ad:
        raise UnsupportedError(f"forward-mode AD gives no tangents through {', '.join(model.no_forward_ad)}")
    order, values, jvps = [], {}, {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.op == "call_function" and isinstance(out, torch.Tensor) and out.is_floating_point():
                primal, tangent = forward_ad.unpack_dual(out)
                name = model.folded_names.get(node.name, node.name)  # a convolution with its batch norm folded in
                order.append({"tensor": name, "node": name, "op_type": _op_name(node.meta.get(ORIGINAL, node.target))})
                values[name] = primal.detach().numpy().copy()
                jvps[name] = np.zeros_like(values[name]) if tangent is None else tangent.numpy().copy()
            return out

    with torch.no_grad(), forward_ad.dual_level():
        args = []
        for spec in model.inputs:
            x = torch.from_numpy(np.ascontiguousarray(xs[spec.name]))
            t = tangents.get(spec.name)
            args.append(forward_ad.make_dual(x, torch.from_numpy(np.ascontiguousarray(t))) if t is not None else x)
        try:
            Recorder(model.module).run(*args)
        except Exception as e:
            raise InputError(f"the program rejected the input while recording its intermediates: {short(e)}") from None
    return order, values, jvps


def _op_name(target) -> str:
    """``aten.conv2d`` for ``aten.conv2d.default``."""
    name = str(target)
    return name[: -len(".default")] if name.endswith(".default") else name
