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
import operator
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
    with _quiet() as warnings:
        try:
            program = _load_program(torch, data)
            module = program.module()
        except _Unregistered as e:
            raise ModelLoadError(
                f"cannot load torch.export program {path}: its inputs or outputs are of the type(s) "
                f"{', '.join(e.types)}, which no module imported here registers with torch.utils._pytree, and jacli "
                f"cannot read them as dicts or tuples ({e.cause})", option="--custom-objects MODULE (the module that "
                "registers them, e.g. transformers; its code runs)", hint="import the module that registers them "
                "before jacli.load") from None
        except Exception as e:
            reason = f"{warnings[-1]}; " if warnings else ""  # what torch logged before its own summary
            raise ModelLoadError(f"cannot load torch.export program {path}: {reason}{short(e)}") from None
    return ExportedModel.wrap_program(program, module, path)


class _Unregistered(Exception):
    def __init__(self, types: list[str], cause: str):
        super().__init__(cause)
        self.types, self.cause = types, cause


def _load_program(torch, data: bytes):
    """``torch.export.load`` of the archive; where its input or output structure uses types
    registered with torch's pytree only by a module not imported here (transformers'
    ``ModelOutput`` dataclasses), the same archive with those nodes read as dicts (keyed by
    their recorded field names) or tuples: the leaves, their order and the graph are the same."""
    try:
        return torch.export.load(io.BytesIO(data))
    except Exception as first:
        rewritten, types = _plain_trees(data)
        if not types:
            raise
        try:
            return torch.export.load(io.BytesIO(rewritten))
        except Exception as e:
            raise _Unregistered(types, short(e)) from first


def _plain_trees(data: bytes) -> tuple[bytes, list[str]]:
    """The archive with each pytree node of an unregistered type in its programs' input and
    output specs replaced by a dict (when its context is its list of keys) or a tuple; and
    the types replaced (none: the archive is returned as it is)."""
    import json

    import torch.utils._pytree as pytree
    from torch.export.pt2_archive import PT2ArchiveReader, PT2ArchiveWriter

    unknown: list[str] = []

    def plain(node):
        kind, children = node.get("type"), node.get("children_spec") or []
        if kind is not None and kind not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            unknown.append(kind)
            try:
                keys = json.loads(node.get("context") or "null")
            except ValueError:
                keys = None
            keyed = isinstance(keys, list) and len(keys) == len(children) and all(isinstance(k, str) for k in keys)
            node["type"], node["context"] = ("builtins.dict", node["context"]) if keyed else ("builtins.tuple", "null")
        for child in children:
            plain(child)

    def visit(obj):
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key in ("in_spec", "out_spec") and isinstance(value, str):
                    protocol, tree = json.loads(value)
                    plain(tree)
                    obj[key] = json.dumps([protocol, tree])
                else:
                    visit(value)
        elif isinstance(obj, list):
            for value in obj:
                visit(value)

    reader = PT2ArchiveReader(io.BytesIO(data))
    names = reader.get_file_names()
    changed = {}
    for name in names:
        if name.startswith("models/") and name.endswith(".json"):
            doc = json.loads(reader.read_bytes(name))
            before = len(unknown)
            visit(doc)
            if len(unknown) > before:
                changed[name] = json.dumps(doc).encode()
    if not changed:
        return data, []
    out = io.BytesIO()
    writer = PT2ArchiveWriter(out)
    for name in names:
        writer.write_bytes(name, changed.get(name) or reader.read_bytes(name))
    writer.close()
    return out.getvalue(), list(dict.fromkeys(unknown))


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
        keys = _output_keys(program.call_spec.out_spec, len(signature.user_outputs))
        m.outputs = [_spec(name, nodes, "output", key) for name, key in zip(signature.user_outputs, keys)]
        m.no_forward_ad = sorted(_higher_order_operators(module) - _FORWARD_AD_THROUGH)
        m._unfrozen, m.folded_names = module, {}  # batch norms folded on first use (_call, _frozen)
        m._checked, m._plain = set(), {}  # signatures that passed the program's call; plain graphs (_run)
        return m

    def _frozen(self, module):
        self.folded_names = _fold_batch_norms(module)
        self._plain = {}  # the graph changed in place
        return module

    def bind(self, xs) -> None:
        """Nothing to learn: the program records its signature."""

    def _run(self, tensors, module):
        """The program's own call (its argument structure, pre-hooks and shape guards) for each
        new signature of the inputs; a signature that passed them runs ``_plain_module``, the
        same graph without that wrapping (the Conv1d net of benchmarks/bench_real.py: 42 against
        98 us a forward pass, against 30 for its TorchScript file)."""
        key = _signature(tensors)
        if key is not None and key in self._checked:
            return self._plain_module(module)(*tensors)
        args, kwargs = self.in_spec.unflatten(list(tensors))
        out = module(*args, **kwargs)
        if key is not None:
            self._checked.add(key)
        return out

    def _plain_module(self, module):
        """``module``'s graph called with the flat inputs, giving the flat outputs: no pytree
        codegen, hooks or ``_guards_fn`` (their checks depend on the inputs' structure and
        shapes only, which ``_run`` checked on the program itself). Kept per module until its
        graph is changed in place (``_frozen``, ``_rewrite``)."""
        import torch

        held = self._plain.get(id(module))
        if held is None or held[0] is not module:
            graph = torch.fx.Graph()  # a plain CodeGen, the nodes copied (not the pytree specs)
            out, _ = graph.graph_copy(module.graph, {}, return_output_node=True)
            graph.output(out)
            for node in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
                graph.erase_node(node)
            held = self._plain[id(module)] = (module, torch.fx.GraphModule(module, graph))
        return held[1]

    def _rewrite(self, torch_once, module):
        """The module itself, its activations rewritten in place (``torch_once.rewrite_fx``)."""
        torch_once.rewrite_fx(module)
        self._plain = {}
        return None

    def _jvp(self, xs, ts, of):
        if self.no_forward_ad:  # the double-VJP fallback does not help: these have no double backward
            raise UnsupportedError(
                f"forward mode: torch's forward-mode AD gives no tangents through {', '.join(self.no_forward_ad)} "
                "(torch.ops.higher_order) in this program", option="--mode reverse", hint="mode='reverse'"
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


def _signature(tensors):
    """What a program's guards can depend on, for flat inputs all tensors: their shapes (the
    logical ones under vmap), dtypes and devices; else None (always the program's own call)."""
    import torch

    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


def _fold_batch_norms(module) -> dict[str, str]:
    """Fold each inference-mode batch norm of the program's top-level graph into the
    convolution before it, where that convolution's output feeds nothing else: the
    convolution's weight and bias are scaled and shifted (in float64, then rounded once to
    their dtype) and the batch norm is taken out. In place; returns {convolution node: batch
    norm output node} of the names, by which ``diff --locate`` reports the convolution's output
    as the batch norm's (the name the ONNX exporter gives that tensor; the convolution's own
    output no longer exists). As ``torch.jit.freeze`` does for TorchScript (torchscript._frozen):
    MobileNetV3-small's Jacobian of 4 samples 61 -> 45 ms, EfficientNet-B0's 260 -> 207 ms."""
    import torch

    aten = torch.ops.aten
    convs = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
    graph, names, dropped = module.graph, {}, set()

    def tensor(node):
        if node is None:
            return None
        if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
            raise LookupError
        value = module
        for part in node.target.split("."):
            value = getattr(value, part)
        return value

    for bn in list(graph.nodes):
        if bn.op != "call_function" or bn.target not in (aten.batch_norm.default,
                                                         aten._native_batch_norm_legit_no_training.default):
            continue
        legit = bn.target is not aten.batch_norm.default
        args = list(bn.args) + [None] * 9
        x, weight, bias, mean, var = args[:5]
        training, eps = (False, args[6]) if legit else (args[5], args[7])
        out = bn
        if legit:  # (output, mean, rstd): only the output used
            if any(u.target is not operator.getitem or u.args[1] != 0 for u in bn.users) or len(bn.users) != 1:
                continue
            out = next(iter(bn.users))
        conv = x
        if training is not False or not isinstance(eps, float) or not isinstance(conv, torch.fx.Node) \
                or conv.op != "call_function" or conv.target not in convs or len(conv.users) != 1 or conv.kwargs:
            continue
        try:
            w, b = tensor(conv.args[1]), tensor(conv.args[2] if len(conv.args) > 2 else None)
            gamma, beta, mu, sigma2 = tensor(weight), tensor(bias), tensor(mean), tensor(var)
        except LookupError:  # an operand computed in the graph, not a weight: left as it is
            continue
        if mu is None or sigma2 is None or not w.is_floating_point():
            continue
        scale = (gamma.double() if gamma is not None else 1.0) / torch.sqrt(sigma2.double() + eps)
        new_w = (w.double() * scale.reshape(-1, *[1] * (w.dim() - 1))).to(w.dtype)
        shift = (b.double() if b is not None else 0.0) - mu.double()
        new_b = (shift * scale + (beta.double() if beta is not None else 0.0)).to(w.dtype)
        attrs = []
        for kind, value in (("weight", new_w), ("bias", new_b)):
            attrs.append(f"_jacli_folded_{len(names)}_{kind}")
            module.register_buffer(attrs[-1], value, persistent=False)
        with graph.inserting_before(conv):
            w_node, b_node = (graph.get_attr(a) for a in attrs)
        conv_args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
        conv_args_before = list(conv_args)
        conv_args[1], conv_args[2] = w_node, b_node
        conv.args = tuple(conv_args)
        names[conv.name] = out.name
        out.replace_all_uses_with(conv)
        for node in ([out, bn] if legit else [bn]):
            graph.erase_node(node)
        dropped.update(n.target for n in (conv_args_before[1], conv_args_before[2], weight, bias, mean, var)
                       if isinstance(n, torch.fx.Node))
    if names:
        graph.eliminate_dead_code()
        used = {node.target for node in graph.nodes if node.op == "get_attr"}
        for target in dropped - used:  # the weights folded away, unless something else reads them
            owner, _, attr = target.rpartition(".")
            try:
                delattr(module.get_submodule(owner) if owner else module, attr)
            except AttributeError:  # held some other way: kept, only memory is lost
                pass
        module.recompile()
    return names


def _higher_order_operators(module) -> set[str]:
    """Names of the higher-order operators (control flow, wrappers) the module calls, in
    subgraphs too."""
    import torch

    return {node.target.name() for graph_module in module.modules() if isinstance(graph_module, torch.fx.GraphModule)
            for node in graph_module.graph.nodes if isinstance(node.target, torch._ops.HigherOrderOperator)}


def _spec(name, nodes: dict, kind: str, key: str | None = None) -> TensorSpec:
    """A user input or output from its node's example value: symbolic dimensions are None.
    Named ``key`` when given (the field of a dict or dataclass output), else by its node."""
    import torch

    value = nodes[name].meta.get("val") if isinstance(name, str) and name in nodes else None
    if not isinstance(value, torch.Tensor):
        raise ModelLoadError(f"the program's {kind} {name!r} is not a tensor; jacli differentiates tensors only")
    shape = tuple(d if isinstance(d, int) else None for d in value.shape)
    return TensorSpec(key or name, shape, str(value.dtype).replace("torch.", ""))


def _output_keys(spec, count: int) -> list:
    """The field names of outputs returned as one flat dict or dataclass of tensors (as
    transformers models return them), else None for each."""
    keys = spec.context if spec.type is dict or spec.num_children == count and isinstance(spec.context, list) else None
    flat = isinstance(keys, list) and len(keys) == count and all(isinstance(k, str) for k in keys) \
        and all(child.is_leaf() for child in spec.children())
    return list(keys) if flat else [None] * count


@contextmanager
def _quiet():
    """torch.export logs warnings (tracebacks included) to stderr while it loads; jacli
    reports a failure as one line instead. Yields the root causes of what ``torch.export``
    itself logged (its load reports the real error only there)."""
    kept, silenced = logging.getLogger("torch.export"), logging.getLogger("torch._export")
    saved = [(lg, lg.level, lg.propagate, lg.handlers[:]) for lg in (kept, silenced)]
    caught: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            try:
                text = short(record.exc_info[1]) if record.exc_info and record.exc_info[1] else record.getMessage()
            except Exception:  # a message whose arguments do not fit its format
                text = str(record.msg)
            caught.append(" ".join(text.split())[:300])

        def handleError(self, record):  # never print logging's own errors
            pass

    kept.setLevel(logging.WARNING)
    kept.propagate, kept.handlers = False, [Keep(logging.WARNING)]
    silenced.setLevel(logging.CRITICAL)
    try:
        yield caught
    finally:
        for lg, level, propagate, handlers in saved:
            lg.setLevel(level)
            lg.propagate, lg.handlers = propagate, handlers
