"""A SavedModel's serving signature inlined: its operations themselves, imported into each of
jacli's graphs, instead of one function-call op.

Called as a function (``StatefulPartitionedCall``), the signature is differentiated by
TensorFlow through generated forward and backward functions, and under two nested tapes or
pfor through higher-order ones: several times the tracing, the memory and the run time of
the same operations in the graph itself (docs/performance.md, "TensorFlow's graphs").

1. Grappler's function-inlining pass alone (``_run_inline_graph_optimization``, the first
   step of ``convert_variables_to_constants_v2``) gives the signature as one GraphDef with
   every call inlined. Loops and conditionals (``While``, ``If``) stay, with their bodies in
   the GraphDef's library. The variables stay what they were: placeholders for their
   handles, which each import binds to the loaded variables, so the weights are held once.
2. Unless the model is trusted, every operation of that GraphDef, and of the functions its
   loops call, must be on the SavedModel allow-list (savedmodel_checks.py) which the
   signature's own functions already passed.
3. ``InlinedSignature(**inputs)``, inside a ``tf.function``: ``import_graph_def`` with the
   inputs and the variables' handles mapped in, then each imported operation is recorded on
   the active tapes and forward accumulators with its registered gradient, as TensorFlow's
   op wrappers record the operations they create.

Where a step fails (Grappler fails, or leaves a call it would not inline), ``inline``
raises ``NotInlined`` and the model keeps the function-call path; so does a signature with
custom gradients saved with it (``why_called``), whose inlined copy serves the float64 copy
only (tf_float64.py).
"""
from __future__ import annotations

import itertools

from ._common import short

CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")
_imports = itertools.count()


class NotInlined(Exception):
    """The signature cannot be inlined; the reason, for a note."""


def inline(tf, signature, trust: bool) -> "InlinedSignature":
    """The serving ``signature`` (a ConcreteFunction, not yet differentiated: TensorFlow then
    appends its gradient's intermediates to its outputs), inlined, or ``NotInlined``."""
    try:
        from tensorflow.python.framework.convert_to_constants import _run_inline_graph_optimization

        graph_def = _run_inline_graph_optimization(signature, lower_control_flow=False, aggressive_inlining=False)
    except Exception as e:  # noqa: BLE001 — anything Grappler cannot take keeps the call
        raise NotInlined(f"Grappler cannot inline the signature: {short(e)}") from None
    calls = sorted({n.op for n in graph_def.node if n.op in CALL_OPS})
    if calls:
        raise NotInlined(f"Grappler left {', '.join(calls)} in the signature")
    if not trust:
        from .savedmodel_checks import graph_def_problems

        problems = graph_def_problems(graph_def, "the inlined serving_default signature")
        if problems:
            raise NotInlined(f"the inlined signature holds operations outside the allow-list: {problems[0]}")
    return InlinedSignature(tf, signature, graph_def)


class InlinedSignature:
    """Called with the signature's inputs by keyword inside a ``tf.function``; returns
    ``{output name: tensor}``. ``captures``: (placeholder name, the value it is bound to:
    a loaded variable's handle, or a captured tensor); ``variables``: the signature's
    variables (tf_float64.py makes float64 twins of them)."""

    def __init__(self, tf, signature, graph_def):
        self.tf, self.graph_def = tf, graph_def
        keywords = list(getattr(signature, "_arg_keywords", None) or ())  # the order of its flat inputs
        names = sorted(signature.structured_outputs)  # tf.nest's order of a dict
        placeholders = list(signature.graph.internal_captures)
        if len(signature.inputs) != len(keywords) + len(placeholders) or len(signature.outputs) < len(names):
            raise NotInlined("the signature's flat inputs or outputs are not its keywords' and captures'")
        self.inputs = dict(zip(keywords, (t.name for t in signature.inputs)))
        self.specs = dict(signature.structured_input_signature[1])
        self.outputs = {k: t.name for k, t in zip(names, signature.outputs)}
        self.captures = [(p.name, value) for p, value in zip(placeholders, signature.captured_inputs)]
        self.variables = signature.graph.variables
        self.graph_def = _unbound(graph_def, {n for n in self.inputs.values()} | {n for n, _ in self.captures})

    def why_called(self) -> str | None:
        """Why jacli's graphs must call the signature instead of importing it, or None: a
        custom gradient saved with the model (``tf.custom_gradient``) is a function bound to
        tensors of the signature's own graph, which an imported copy does not have."""
        custom = sorted({n.name for n in self.graph_def.node if "_gradient_op_type" in n.attr})
        if custom:
            return f"the signature has custom gradients saved with it (at {custom[0]})"
        return None

    def twin(self, graph_def, captures):
        """The same signature as another GraphDef of the same names, bound to other captures."""
        twin = object.__new__(InlinedSignature)
        twin.__dict__.update(self.__dict__, graph_def=graph_def, captures=captures)
        return twin

    def __call__(self, **xs):
        tf = self.tf
        graph = tf.compat.v1.get_default_graph()
        before = len(graph.get_operations())
        bound = {self.inputs[k]: x for k, x in xs.items()}
        bound.update((name, graph.capture(value)) for name, value in self.captures)
        graph_def = _renamed(self.graph_def)
        out = tf.graph_util.import_graph_def(graph_def, input_map=bound, return_elements=list(self.outputs.values()),
                                             name="signature")
        if graph_def.library.function:  # the loops' bodies, where the graph's function will look them up when run
            from tensorflow.python.eager import context

            for function in graph_def.library.function:
                context.context().add_function_def(function)
        for op in graph.get_operations()[before:]:  # in the order imported: topological
            _record(op)
        return dict(zip(self.outputs, out))


def _unbound(graph_def, bound: set[str]):
    """The GraphDef with each placeholder that every import binds (``input_map``) made a
    scalar constant: imported, it is used by nothing, but a placeholder left in a graph
    stops XLA from compiling it (no kernel), and ``input_map`` needs the name to exist."""
    out = type(graph_def)()
    out.CopyFrom(graph_def)
    for node in out.node:
        if node.op == "Placeholder" and f"{node.name}:0" in bound:
            node.op = "Const"
            node.ClearField("attr")
            node.attr["dtype"].type = 1  # DT_FLOAT
            node.attr["value"].tensor.dtype = 1
            node.attr["value"].tensor.float_val.append(0.0)
    return out


def _renamed(graph_def):
    """The GraphDef with its library's functions (loop bodies) renamed for this import:
    differentiating a loop rewrites its body under the body's name plus ``_rewritten``,
    and two graphs that differentiate the same loop differently would clash in
    TensorFlow's function registry."""
    if not graph_def.library.function:
        return graph_def
    suffix = f"_jacli{next(_imports)}"
    names = {f.signature.name: f.signature.name + suffix for f in graph_def.library.function}
    out = type(graph_def)()
    out.CopyFrom(graph_def)

    def rename(node):
        if node.op in names:
            node.op = names[node.op]
        for attr in node.attr.values():
            kind = attr.WhichOneof("value")
            if kind == "func" and attr.func.name in names:
                attr.func.name = names[attr.func.name]
            elif kind == "list":
                for f in attr.list.func:
                    if f.name in names:
                        f.name = names[f.name]

    for node in out.node:
        rename(node)
    for function in out.library.function:
        function.signature.name = names[function.signature.name]
        for node in function.node_def:
            rename(node)
    for gradient in out.library.gradient:
        gradient.function_name = names.get(gradient.function_name, gradient.function_name)
        gradient.gradient_func = names.get(gradient.gradient_func, gradient.gradient_func)
    return out


def _record(op) -> None:
    """Record ``op`` on the active tapes and forward accumulators as TensorFlow's generated
    op wrappers record the operations they create (``record_gradient``): its registered
    gradient is looked up by its type, called with the inputs the tape does not need
    skipped (no gradient of the weight in a Mul or an AddV2, say), and forward mode gets the
    op's own JVP."""
    from tensorflow.python.eager import backprop

    attrs = []
    for name in op.node_def.attr:
        if not name.startswith("_"):  # TensorFlow's private attributes are not the op's
            attrs += [name, op.get_attr(name)]
    backprop.record_gradient(op.type, list(op.inputs), tuple(attrs), list(op.outputs))
