"""TorchScript archives (``torch.jit.save``, traced or scripted) and, only with
``--trust-model``, plain ``torch.save`` pickles of an ``nn.Module``.

Derivatives come from torch's own autodiff: VJPs by ``torch.autograd.grad``, JVPs by
forward-mode AD (dual tensors), falling back to the double-VJP trick when an operator
lacks a forward-mode formula; a block of k seeds by ``torch.func.vmap`` over one forward
pass's backward pass or JVP (or k backward passes through it), see ``TorchModel._map_strategies``.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from ..errors import InputError, LimitationError, ModelLoadError, UnsupportedError
from ..model import MapUnavailable, Model, TensorSpec
from ._common import Constants, require, short


def load(path: str, trust: bool = False) -> "TorchModel":
    from .. import limits

    torch = require("torch", "torch", "torch", "TorchScript")
    data = limits.read_regular(path, "model", ModelLoadError)  # read once: what is checked is what is loaded
    if not trust:  # torch.jit.load compiles the archive's code and runs any __setstate__
        from .refusal import refuse
        from .torch_checks import torchscript_problems

        refuse(path, torchscript_problems(path, data))
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as e:
        raise ModelLoadError(f"cannot load TorchScript model {path}: {short(e)}") from None
    return TorchModel.wrap(module, path, "torchscript")


def load_pickle(path: str, trust: bool = False) -> "TorchModel":
    torch = require("torch", "torch", "torch", "PyTorch")
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelLoadError(f"cannot load PyTorch model {path}: {short(e)}") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"{path} holds a {type(module).__name__}, not a torch.nn.Module (a state_dict has no architecture)")
    return TorchModel.wrap(module, path, "torch-pickle")


class TorchModel(Model):
    @classmethod
    def wrap(cls, module, path: str, fmt: str) -> "TorchModel":
        module.eval()
        freeze(module)
        m = cls(path=path, format=fmt, backend="torch", supports_float64=True)
        floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
        dtype = str(floats[0]).replace("torch.", "") if floats else "float32"
        names, m.optional_arguments = _arguments(module)
        integers = _index_inputs(module)
        m.module = m._unfrozen = module  # frozen on first use (_call): inspecting a model needs no freezing
        m.inputs = [TensorSpec(n, None, "int64" if n in integers else dtype) for n in names]
        return m

    def describe(self) -> dict:
        info = super().describe()
        if getattr(self, "optional_arguments", None):
            info["optional_arguments"] = self.optional_arguments  # not inputs: their defaults are used
        return info

    # --- helpers ------------------------------------------------------------------------
    def bind(self, xs) -> None:
        """Learn input dtypes/shapes and output names from a real input (TorchScript has no signature)."""
        self.inputs = [TensorSpec(s.name, (None, *xs[s.name].shape[1:]), str(xs[s.name].dtype)) for s in self.inputs]
        ys = self._forward(xs)
        self.outputs = [TensorSpec(n, (None, *v.shape[1:]), str(v.dtype)) for n, v in ys.items()]

    def _call(self, tensors, differentiated: bool = False):
        """Run the module: (output names, output tensors). ``differentiated``: a call whose
        derivatives are taken in reverse mode, which runs the derivative graph (``_derivative``)."""
        torch = _torch()
        module = self._derivative() if differentiated else self._module()
        try:
            # TorchScript's optimising executor re-profiles for every new batch size, and
            # its differentiable graphs are slower here than the plain interpreter
            with torch.jit.optimized_execution(False), self._differentiating(differentiated):
                out = self._run(tensors, module)
        except Exception as e:
            raise InputError(f"the model rejected the input: {short(e)}") from None
        return self._named(out)

    def _module(self):
        """The module, frozen on first use (``_frozen``)."""
        if self.module is getattr(self, "_unfrozen", None):
            self.module, self._unfrozen = self._frozen(self.module), None
        return self.module

    def _derivative(self):
        """What differentiated calls run: the module with its GELU and SiLU activations'
        derivatives computed once per forward pass (``torch_once``), or the module itself.
        Built on first use, from the frozen module; not for the float64 copy (``_forward64``)."""
        module = self._module()
        if getattr(self, "_derivative_of", None) is not module:
            from . import torch_once

            self._derivative_of, self._rewritten = module, self._rewrite(torch_once, module)
        return self._rewritten or module

    def _differentiating(self, differentiated: bool = True):
        from contextlib import nullcontext

        from . import torch_once

        return torch_once.differentiating() if differentiated else nullcontext()

    def _rewrite(self, torch_once, module):
        torch = _torch()
        if not isinstance(module, torch.jit.ScriptModule):
            return None
        graph = torch_once.derivative_graph(module)
        if graph is None:
            return None
        # a graph function has no defaults: forward's optional arguments (after the inputs) get theirs
        defaults = [a.default_value for a in module.forward.schema.arguments[1 + len(self.inputs):]]
        return lambda *tensors: graph(module, *tensors, *defaults)

    def _run(self, tensors, module):
        return module(*tensors)

    def _frozen(self, module):
        """The module to run from its first call on: frozen for inference (``_frozen``)."""
        return _frozen(module)

    def _named(self, out):
        """Names for what ``forward`` returned: ``output``, ``output_i`` or the dict's keys."""
        torch = _torch()
        if isinstance(out, torch.Tensor):
            names, outs = ["output"], [out]
        elif isinstance(out, dict):
            names, outs = list(out), list(out.values())
        elif isinstance(out, (tuple, list)):
            names, outs = [f"output_{i}" for i in range(len(out))], list(out)
        else:
            raise ModelLoadError(f"the model returns a {type(out).__name__}; jacli needs tensors, tuples or dicts of them")
        return names, outs

    def _seed(self, a):
        """A cotangent/tangent block as a tensor: shared with a writable array; the engine's
        recurring read-only seed blocks copied once and kept (``Constants``)."""
        if getattr(self, "_seeds", None) is None:
            torch = _torch()
            self._seeds = Constants(lambda v: torch.from_numpy(np.ascontiguousarray(v) if v.flags.writeable else np.array(v)))
        return self._seeds(np.asarray(a))

    def _tensors(self, xs, requires_grad=(), dtype=None):
        torch = _torch()
        ts = []
        for s in self.inputs:
            a = np.asarray(xs[s.name])
            if not a.flags.writeable:  # torch.from_numpy wants writable memory
                a = a.copy()
            t = torch.from_numpy(np.ascontiguousarray(a if dtype is None or a.dtype.kind != "f" else a.astype(dtype)))
            if s.name in requires_grad:
                t.requires_grad_(True)
            ts.append(t)
        return ts

    # --- the protocol -------------------------------------------------------------------
    def _forward(self, xs):
        torch = _torch()
        with torch.no_grad():
            names, outs = self._call(self._tensors(xs))
        return {n: o.numpy() for n, o in zip(names, outs)}

    def _forward64(self, xs):
        """The forward pass of a float64 copy (``_float64_copy``), run with float64 as torch's
        default dtype so that tensors the code creates (an RNN's zero initial state) are
        float64 too. Where the copy fails and the model itself runs, a limitation."""
        torch = _torch()
        module64 = getattr(self, "_module64", None)
        if module64 is None:
            module64 = self._module64 = self._float64_copy()
        main, self.module, default = self.module, module64, torch.get_default_dtype()
        try:
            torch.set_default_dtype(torch.float64)
            with torch.no_grad():
                names, outs = self._call(self._tensors(xs, dtype=np.float64))
        except InputError as e:
            torch.set_default_dtype(default)
            self.module = main
            self._forward(xs)  # the user's input error, if it is one
            raise LimitationError(f"the float64 copy of this model fails where the model runs "
                                  f"({e.message.removeprefix('the model rejected the input: ')})") from None
        finally:
            torch.set_default_dtype(default)
            self.module = main
        return {n: o.numpy() for n, o in zip(names, outs)}

    def _float64_copy(self):
        """The module with float64 parameters and buffers, for finite differences. A TorchScript
        module is copied by saving and reloading it (a deep copy would share its code, which is
        edited here), and its code's float32 constants and dtype arguments become float64."""
        import copy
        import io
        import warnings

        torch = _torch()
        if isinstance(self.module, torch.jit.ScriptModule):
            buffer = io.BytesIO()
            torch.jit.save(self.module, buffer)
            buffer.seek(0)
            module = torch.jit.load(buffer, map_location="cpu").double()
            _retype_float_constants(module)
            freeze(module)
            return module
        with warnings.catch_warnings():  # deepcopy touches .grad of non-leaf parameters
            warnings.simplefilter("ignore")
            return copy.deepcopy(self.module).double()

    def _vjp(self, xs, cts, wrt: Sequence[str]):
        return self._pullback(xs, cts, wrt)

    def _map_strategies(self, prim) -> tuple[str, ...]:
        """VJPs: "vectorised" (one forward pass, its backward pass vmapped over the k
        cotangents: ``_vmapped_grad``, or torch.func's pullback) or "sequential" (k backward
        passes through one recorded forward pass; faster where an operator has no fast
        batching rule). JVPs: "vectorised" (the JVP vmapped over the k tangents), except
        through control-flow operators whose tangents forward-mode AD drops
        (``no_forward_ad``); else the k tangents are folded into the batch."""
        if prim == self._vjp:
            options = ("vectorised", "sequential")
        else:
            options = () if getattr(self, "no_forward_ad", ()) else ("vectorised",)
        dropped = getattr(self, "_unmappable", set())
        return tuple(s for s in options if (prim.__name__, s) not in dropped)

    def _vjp_jvp_map(self, prim, xs, seeds, names, strategy=""):
        if strategy == "vectorised":
            try:
                return self._vectorised(prim == self._vjp, xs, seeds, names)
            except Exception:  # an operator torch.func cannot batch or trace (e.g. .item(), in-place on an input)
                self._forward(xs)  # a bad input is reported as such, not taken for an unbatchable model
                self._unmappable = {*getattr(self, "_unmappable", ()), (prim.__name__, strategy)}
                raise MapUnavailable(strategy) from None
        if strategy == "sequential":
            return self._pullback(xs, seeds, names, sequential=True)
        return super()._vjp_jvp_map(prim, xs, seeds, names)

    def _vectorised(self, reverse: bool, xs, seeds, names):
        """torch.func over the k axis of ``seeds``: ``vmap`` of one forward pass's pullback
        (reverse; ``names`` are the inputs) or of its pushforward (forward; ``names`` are the
        outputs), the forward pass itself run once, unbatched."""
        import warnings

        torch = _torch()
        order = [s.name for s in self.inputs]
        tensors = dict(zip(order, self._tensors(xs)))
        varied = [n for n in order if n in (names if reverse else seeds)]  # the inputs differentiated
        taken = [n for n in seeds] if reverse else list(names)  # the outputs differentiated

        def f(*primals):
            got = dict(zip(*self._named(self._run([{**tensors, **dict(zip(varied, primals))}[n] for n in order],
                                                  module))))
            return tuple(got[n] for n in taken)

        primals = tuple(tensors[n] for n in varied)
        # forward mode runs the model's own graph: a rewritten activation's tangent takes three
        # passes over the k tangents (sub, mul, add) where torch's formula takes one (the Conv1d
        # net's JVPs 33 -> 45 ms); reverse mode's add and sub pass the cotangent through
        module = self._derivative() if reverse else self._module()
        if reverse and not getattr(self, "_functorch_vjp", False):
            grads = self._vmapped_grad(xs, seeds, varied, taken)
            if grads is not None:
                return grads
        with warnings.catch_warnings(), torch.jit.optimized_execution(False), self._differentiating(reverse):
            warnings.simplefilter("ignore")  # functorch's "performance drop" notes for unbatched operators
            if reverse:
                _, pullback = torch.func.vjp(f, *primals)
                grads = torch.func.vmap(pullback)(tuple(self._seed(seeds[n]) for n in taken))
                return {n: g.numpy() for n, g in zip(varied, grads)}
            pushforward = lambda *t: torch.func.jvp(f, primals, t)[1]  # noqa: E731
            outs = torch.func.vmap(pushforward)(*(self._seed(seeds[n]) for n in varied))
            return {n: o.numpy() for n, o in zip(taken, outs)}

    def _vmapped_grad(self, xs, cts, wrt, taken):
        """The vectorised VJP as ``vmap`` over one plain backward pass (``torch.autograd.grad``)
        through a forward pass recorded outside it: no torch.func transform (whose first
        pullback in a process can import torch._dynamo, 1-3 s) and no double-backward graph
        (10-15% faster on small nets). None, and torch.func's ``vjp`` for this model from then
        on, where an operator's backward has no batching rule (vmap then loops over the k
        seeds: the LSTM's mkldnn kernel, whose torch.func forward pass avoids it) or vmap
        cannot take it at all."""
        import warnings

        torch = _torch()
        with torch.enable_grad():
            ts = self._tensors(xs, requires_grad=wrt)
            names, outs = self._call(ts, differentiated=True)
            pairs = [(o, self._seed(cts[n])) for n, o in zip(names, outs) if n in taken and o.requires_grad]
            targets = [t for s, t in zip(self.inputs, ts) if s.name in wrt]
            if not pairs:  # no output depends on the inputs: zero
                return {n: np.zeros((_leading(cts),) + xs[n].shape, xs[n].dtype) for n in wrt}
            outputs = [o for o, _ in pairs]
            grad = lambda *cs: torch.autograd.grad(outputs, targets, cs, allow_unused=True,  # noqa: E731
                                                   materialize_grads=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    grads = torch.func.vmap(grad)(*(c for _, c in pairs))
                except Exception:
                    grads = None
        if grads is None or any("batching rule" in str(w.message) for w in caught):
            self._functorch_vjp = True
            return None
        return {n: g.numpy() for n, g in zip(wrt, grads)}

    def _pullback(self, xs, cts, wrt, sequential: bool = False):
        """Input gradients for cotangents ``cts``: one backward pass, or, ``sequential``, one
        per entry of the cotangents' leading k axis, through one recorded forward pass."""
        torch = _torch()
        lead = (next(iter(cts.values())).shape[0],) if sequential else ()
        with torch.enable_grad():
            ts = self._tensors(xs, requires_grad=wrt)
            names, outs = self._call(ts, differentiated=True)
            # outputs that do not depend on any input (detached, constant) contribute zero
            pairs = [(o, self._seed(cts[n]))
                     for n, o in zip(names, outs) if n in cts and o.requires_grad]
            targets = [t for s, t in zip(self.inputs, ts) if s.name in wrt]
            outputs = [o for o, _ in pairs]
            grad = lambda cs, **kw: _grad(outputs, targets, cs, **kw)  # noqa: E731
            if not pairs:
                grads = [None] * len(targets)
            elif sequential:
                rows = [grad([c[i] for _, c in pairs], retain_graph=i < lead[0] - 1) for i in range(lead[0])]
                grads = [None if rows[0][j] is None else torch.stack([r[j] for r in rows]) for j in range(len(targets))]
            else:
                grads = grad([c for _, c in pairs])
        return {
            n: (np.zeros(lead + xs[n].shape, xs[n].dtype) if g is None else g.detach().numpy())
            for n, g in zip(wrt, grads)
        }

    def _jvp(self, xs, ts, of: Sequence[str]):
        torch = _torch()
        import torch.autograd.forward_ad as fwAD

        try:
            with fwAD.dual_level(), torch.no_grad():
                duals = [
                    fwAD.make_dual(t, self._seed(ts[s.name])) if s.name in ts else t
                    for s, t in zip(self.inputs, self._tensors(xs))
                ]
                names, outs = self._call(duals)
                result = {}
                for n, o in zip(names, outs):
                    if n in of:
                        tangent = fwAD.unpack_dual(o).tangent
                        result[n] = np.zeros(o.shape, np.dtype(str(o.dtype).replace("torch.", ""))) if tangent is None else tangent.numpy().copy()
                return result
        except (RuntimeError, NotImplementedError, InputError):
            # an operator without a forward-mode rule fails inside the module, which _call
            # reports as InputError; a real input error recurs in the fallback and is raised there
            return self._jvp_by_double_vjp(xs, ts, of)

    def _jvp_by_double_vjp(self, xs, ts, of):
        """J t = d/du <J^T u, t>: two reverse passes, for operators without forward-mode rules."""
        torch = _torch()
        with torch.enable_grad():
            tx = self._tensors(xs, requires_grad=list(ts))
            names, outs = self._call(tx, differentiated=True)
            outs = {n: o for n, o in zip(names, outs) if n in of}
            us = {n: torch.zeros_like(o, requires_grad=True) for n, o in outs.items()}
            targets = [t for s, t in zip(self.inputs, tx) if s.name in ts]
            wrt = [s for s in self.inputs if s.name in ts]
            try:
                g = torch.autograd.grad(list(outs.values()), targets, list(us.values()), create_graph=True,
                                        allow_unused=True)
                pairs = [(gi, self._seed(ts[s.name])) for gi, s in zip(g, wrt) if gi is not None]
                if not pairs:
                    return {n: np.zeros(o.shape, o.detach().numpy().dtype) for n, o in outs.items()}
                jt = torch.autograd.grad([p for p, _ in pairs], list(us.values()), [t for _, t in pairs],
                                         allow_unused=True)
            except (RuntimeError, NotImplementedError) as e:
                missing = _missing_derivative(e)
                if missing is not None:  # no derivative at all: reverse mode cannot help either
                    raise missing from None
                raise UnsupportedError(f"forward mode needs a forward-mode rule or a second derivative that torch "
                                       f"lacks here ({short(e)})", option="--mode reverse",
                                       hint="mode='reverse'") from None
        return {n: (np.zeros(outs[n].shape, np.float32) if v is None else v.numpy()) for n, v in zip(us, jt)}


def _leading(arrays) -> int:
    return next(iter(arrays.values())).shape[0]


def _grad(outputs, targets, cotangents, **kw):
    """``torch.autograd.grad``; an operator without a derivative is a limitation that names it."""
    torch = _torch()
    try:
        return torch.autograd.grad(outputs, targets, cotangents, allow_unused=True, **kw)
    except NotImplementedError as e:
        missing = _missing_derivative(e)
        if missing is None:
            raise
        raise missing from None


def _missing_derivative(e: BaseException) -> LimitationError | None:
    """The operator torch has no derivative for (not the derivative of a backward operator,
    which only a second derivative needs), as a limitation."""
    import re

    found = re.search(r"derivative for '?([\w.:]+)'? is not implemented", str(e))
    if found is None or found.group(1).endswith("_backward"):
        return None
    return LimitationError(f"torch has no derivative for the operator {found.group(1)} in this model",
                           operator=found.group(1), option="--method fd (finite differences)",
                           hint="method='fd' (finite differences)")


def freeze(module) -> None:
    """Derivatives are taken w.r.t. inputs only: parameters need no gradients (4x faster backward passes)."""
    for p in module.parameters():
        p.requires_grad_(False)


# Operators that freezing may take out of a graph without changing its derivatives. Freezing
# drops what runs on constants only (weights, shapes: evaluated once), the branches constant
# attributes rule out (``self.training``'s, a script's shape checks) and the batch norms it
# folds into the convolution or linear layer before them; and it drops operators that change
# nothing at inference, among them ``aten::detach``, whose derivative is zero where the
# identity's is one. So a graph loses only operators of this list, or the module stays unfrozen:
# folded or identity at inference with the identity's derivative, arithmetic, shape, comparison
# and bookkeeping operators, and the in-place updates of a training branch.
_DROPPABLE = {
    "aten::batch_norm", "aten::dropout", "aten::feature_dropout", "aten::alpha_dropout", "aten::feature_alpha_dropout",
    "aten::add", "aten::sub", "aten::mul", "aten::div", "aten::floor_divide", "aten::linear", "aten::add_",
    "aten::relu_", "aten::zeros", "aten::ones", "aten::full", "aten::t", "aten::transpose", "aten::permute",
    "aten::reshape", "aten::view", "aten::squeeze", "aten::unsqueeze", "aten::slice", "aten::to", "aten::contiguous",
    "aten::Int", "aten::Float", "aten::ScalarImplicit", "aten::size", "aten::dim", "aten::len", "aten::numel",
    "aten::__getitem__", "aten::list", "aten::format", "aten::warn", "aten::eq", "aten::ne", "aten::lt", "aten::le",
    "aten::gt", "aten::ge", "aten::__is__", "aten::__isnot__", "aten::__not__", "aten::__contains__",
}


def _frozen(module):
    """A TorchScript module frozen for inference (``torch.jit.freeze``, 0.06 s for ResNet-18, 0.18 s
    for EfficientNet-B0, as long as loading them): its weights become
    constants of its graph, and batch norms are folded into the convolutions and linear
    layers before them, so every forward and backward pass skips them (traced, 1 thread, a
    Jacobian of 4 samples: MobileNetV3-small 66 -> 37 ms, EfficientNet-B0 270-320 -> 163-182
    ms, ResNet-18 247-265 -> 221-231 ms; float32 rounding of the folded weights moves the
    Jacobian by under 1e-6 of its largest entry). Freezing also drops operators that do
    nothing at inference but do have a derivative of their own (``detach``): where it took
    out anything but ``_DROPPABLE`` operators and ``prim::`` bookkeeping, and where it cannot
    freeze the module at all (attributes set in ``forward``), the module is used as loaded;
    so is a plain ``nn.Module``."""
    import warnings

    torch = _torch()
    if not isinstance(module, torch.jit.ScriptModule):
        return module
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = torch.jit.freeze(module)
        before, after = _operator_counts(module.inlined_graph), _operator_counts(frozen.graph)
    except Exception:  # freezing's own limits (attributes set in forward, interface calls)
        return module
    dropped = {k for k, n in before.items() if after.get(k, 0) < n and not k.startswith("prim::")}
    return frozen if dropped <= _DROPPABLE else module


def _operator_counts(graph) -> dict[str, int]:
    """How many nodes of each kind ``graph`` holds, inside its blocks (if/loop bodies) too."""
    counts = {}
    for node in nodes(graph):
        counts[node.kind()] = counts.get(node.kind(), 0) + 1
    return counts


def nodes(graph) -> list:
    """Every node of a TorchScript graph, inside its blocks (if/loop bodies) too."""
    todo, found = list(graph.nodes()), []
    while todo:
        node = todo.pop()
        found.append(node)
        for block in node.blocks():
            todo += list(block.nodes())
    return found


def _arguments(module) -> tuple[list[str], list[dict]]:
    """``forward``'s inputs: its tensor arguments without defaults, in order; and the
    arguments with defaults (optional tensors, flags, numbers), which are not inputs: jacli
    leaves them at their defaults. A required argument that is not a tensor cannot be given."""
    try:
        arguments = module.forward.schema.arguments[1:]  # TorchScript: skip self
    except AttributeError:  # a plain nn.Module (trusted pickle)
        import inspect

        parameters = inspect.signature(module.forward).parameters.values()
        return ([p.name for p in parameters if p.default is inspect.Parameter.empty],
                [{"name": p.name, "default": repr(p.default)} for p in parameters
                 if p.default is not inspect.Parameter.empty])
    names, optional = [], []
    for a in arguments:
        kind = str(a.type)
        if a.has_default_value():
            optional.append({"name": a.name, "type": kind, "default": repr(a.default_value)})
        elif kind in ("Tensor", "Optional[Tensor]"):
            names.append(a.name)
        else:
            raise ModelLoadError(f"forward's argument {a.name!r} is {kind} and has no default; jacli passes tensors "
                                 "only (wrap the model so that forward takes tensors)")
    return names, optional


# operators whose argument at this position holds indices, and operators that pass an
# integer tensor through (views, copies): an input that reaches one is integer
_INDEX_ARGUMENT = {"aten::embedding": 1, "aten::embedding_bag": 1, "aten::index_select": 2, "aten::gather": 2,
                   "aten::one_hot": 0, "aten::take": 1, "aten::take_along_dim": 1, "aten::bincount": 0}
_PASS_THROUGH = {"aten::slice", "aten::select", "aten::view", "aten::reshape", "aten::unsqueeze", "aten::squeeze",
                 "aten::contiguous", "aten::flatten", "aten::expand", "aten::expand_as", "aten::clone",
                 "aten::detach", "aten::narrow", "aten::permute", "aten::transpose", "aten::t", "aten::repeat"}


def _index_inputs(module) -> set[str]:
    """Names of ``forward``'s arguments that its code uses as indices (token ids into an
    Embedding, say): TorchScript records no dtypes, and such an input must stay integer."""
    try:
        graph, arguments = module.inlined_graph, module.forward.schema.arguments
    except (AttributeError, RuntimeError):
        return set()
    found = set()
    for value, argument in zip(list(graph.inputs())[1:], arguments[1:]):  # both start with self
        todo, seen = [value], set()
        while todo and argument.name not in found:
            v = todo.pop()
            if v.unique() in seen:
                continue
            seen.add(v.unique())
            for use in v.uses():
                kind = use.user.kind()
                if _INDEX_ARGUMENT.get(kind) == use.offset:
                    found.add(argument.name)
                elif kind in _PASS_THROUGH and use.offset == 0:
                    todo += list(use.user.outputs())
    return found


_FLOAT_TYPES = (5, 6, 15)  # torch's ScalarType codes of float16, float32, bfloat16
_FLOAT64 = 7


def _retype_float_constants(module) -> None:
    """In the code of every method of a TorchScript module and its submodules: tensor
    constants of a float type become float64, and so does every ``dtype`` argument that names
    one (``torch.zeros(..., dtype=torch.float32)`` in a traced RNN's initial state)."""
    torch = _torch()
    for sub in module.modules():
        if not isinstance(sub, torch.jit.ScriptModule):
            continue
        for name in sub._c._method_names():
            graph = sub._c._get_method(name).graph
            todo = list(graph.nodes())
            while todo:
                node = todo.pop()
                for block in node.blocks():
                    todo += list(block.nodes())
                if node.kind() == "prim::Constant":
                    if node.hasAttribute("value") and node.kindOf("value") == "t" and node.t("value").is_floating_point():
                        node.t_("value", node.t("value").double())
                    continue
                schema = node.schema()
                if schema == "(no schema)":
                    continue
                for i, (argument, value) in enumerate(zip(torch._C.parse_schema(schema).arguments, list(node.inputs()))):
                    source = value.node()
                    if argument.name == "dtype" and source.kind() == "prim::Constant" and source.hasAttribute("value") \
                            and source.kindOf("value") == "i" and source.i("value") in _FLOAT_TYPES:
                        with graph.insert_point_guard(node):
                            node.replaceInput(i, graph.insertConstant(_FLOAT64))


def _torch():
    import torch

    return torch
