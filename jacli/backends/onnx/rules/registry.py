"""The registry of derivative rules, and small helpers shared by rules of every family.

Each rule is an :class:`Entry`: an operator, the range of operator versions it serves
(``since``/``until``, versions as in ``onnx.defs``: a model's opset is resolved to the
operator's version with ``onnx.defs.get_schema(op, opset).since_version``, as onnx2torch
does, so an entry serves every opset until the operator's schema changes), the inputs it
differentiates (``inputs``; None: every input) and the outputs it may be asked for
(``outputs``; None: every float output), and its VJP and JVP functions. An operator can
have several entries for disjoint sets of inputs (say one for Conv's ``X``/``B`` and one
for its ``W``); the drivers in ``derive`` call each entry for the active inputs it covers
and sum what they give.

An entry can instead give an exact decomposition (``decompose``, e.g. a recurrent
network unrolled over its time steps) into operators that have rules.

A VJP function maps (builder, node, cotangent per output or None) to {input index:
cotangent} for every active input it covers; a JVP function maps (builder, node, tangent
per input or None) to a tangent per output (None where there is none). ``node.active``
holds the active inputs the entry is called for.

Operators whose derivative is zero by definition are entries too (``zero``): integer/bool
outputs, or float outputs that are piecewise constant (zero almost everywhere, as in
PyTorch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from ..graph import Builder, Node

ANY = None  # ``until=ANY``: every later version


@dataclass
class Entry:
    op: str
    since: int = 1
    until: int | None = ANY
    inputs: tuple[int, ...] | None = None
    outputs: tuple[int, ...] | None = None
    vjp: Callable | None = None
    jvp: Callable | None = None
    kind: str = "rule"  # "rule", "zero" (integer/bool outputs) or "piecewise" (float, zero a.e.)
    implicit: bool = False  # also differentiates outer-scope tensors its subgraphs use (control flow)
    expand: Callable | None = None  # (builder, node) -> an output name per output: an exact decomposition
    module: str = ""

    def serves(self, version: int) -> bool:
        return self.since <= version and (self.until is None or version <= self.until)

    def covers(self, index: int) -> bool:
        return self.inputs is None or index in self.inputs


_ENTRIES: dict[str, list[Entry]] = {}


def _entry(op: str, since: int, until: int | None, inputs, outputs, kind: str, module: str) -> Entry:
    """The entry for (op, since, until, inputs), created on first use."""
    inputs = None if inputs is None else tuple(sorted(inputs))
    for e in _ENTRIES.setdefault(op, []):
        if (e.since, e.until, e.inputs) == (since, until, inputs):
            if outputs is not None:
                e.outputs = tuple(outputs)
            return e
    e = Entry(op, since, until, inputs, None if outputs is None else tuple(outputs), kind=kind,
              module=module.rsplit(".", 1)[-1])
    _ENTRIES[op].append(e)
    return e


def _module_of(fn) -> str:
    return getattr(fn, "__module__", "") or ""


def rule(op: str, vjp: Callable | None = None, jvp: Callable | None = None, *, since: int = 1,
         until: int | None = ANY, inputs: Sequence[int] | None = None,
         outputs: Sequence[int] | None = None, implicit: bool = False) -> Entry:
    """Register a VJP and/or JVP function for ``op`` (the functional form of the decorators)."""
    e = _entry(op, since, until, inputs, outputs, "rule", _module_of(vjp or jvp))
    e.implicit = e.implicit or implicit
    if vjp is not None:
        e.vjp = vjp
    if jvp is not None:
        e.jvp = jvp
    return e


def vjp(*ops: str, since: int = 1, until: int | None = ANY, inputs: Sequence[int] | None = None,
        outputs: Sequence[int] | None = None, implicit: bool = False):
    """Decorator: the function is the VJP rule of each of ``ops``."""
    def register(fn):
        for op in ops:
            rule(op, vjp=fn, since=since, until=until, inputs=inputs, outputs=outputs, implicit=implicit)
        return fn

    return register


def jvp(*ops: str, since: int = 1, until: int | None = ANY, inputs: Sequence[int] | None = None,
        outputs: Sequence[int] | None = None, implicit: bool = False):
    """Decorator: the function is the JVP rule of each of ``ops``."""
    def register(fn):
        for op in ops:
            rule(op, jvp=fn, since=since, until=until, inputs=inputs, outputs=outputs, implicit=implicit)
        return fn

    return register


def unary(op: str, since: int = 1, until: int | None = ANY):
    """Decorator for elementwise unary operators: one function v -> v * f'(x) serves both modes."""
    def register(apply: Callable[[Builder, Node, str], str]):
        e = rule(op, vjp=lambda b, n, gs: {0: apply(b, n, gs[0])}, jvp=lambda b, n, ts: [apply(b, n, ts[0])],
                 since=since, until=until, inputs=(0,))
        e.module = _module_of(apply).rsplit(".", 1)[-1]
        return apply

    return register


def decompose(*ops: str, since: int = 1, until: int | None = ANY, inputs: Sequence[int] | None = None,
              outputs: Sequence[int] | None = None):
    """Decorator: the function rewrites the operator into operators that have rules, emitting
    them with the builder and returning the name of each output (None where the node has
    none), or returning None to keep the node for its other entries; the drivers substitute
    it before differentiating, so it serves both modes."""
    def register(fn):
        for op in ops:
            e = _entry(op, since, until, inputs, outputs, "rule", _module_of(fn))
            e.expand = fn
        return fn

    return register


def zero(*ops: str, piecewise: bool = False, since: int = 1, until: int | None = ANY,
         inputs: Sequence[int] | None = None) -> None:
    """Operators whose derivative is zero: integer/bool outputs, or (``piecewise``) float
    outputs that are piecewise constant; with ``inputs``, only with respect to those inputs
    (a float input that only gives a type or a shape)."""
    for op in ops:
        _entry(op, since, until, inputs, None, "piecewise" if piecewise else "zero", "registry")


class _ModeTable:
    """``VJP_RULES``/``JVP_RULES``: ``table[op] = fn`` registers ``fn`` for every version and
    input of ``op`` (as ``@vjp(op)``); ``table[op]`` is that function; ``op in table`` says
    whether any entry of ``op`` has a rule in this mode."""

    def __init__(self, mode: str):
        self.mode = mode

    def __setitem__(self, op: str, fn: Callable) -> None:
        if op in self:  # a second entry would never be used (the first covering an input wins)
            raise ValueError(f"{op} already has a {self.mode.upper()} rule; replace it on its Entry (lookup())")
        rule(op, **{self.mode: fn})

    def __getitem__(self, op: str) -> Callable:
        for e in _ENTRIES.get(op, []):
            if getattr(e, self.mode) is not None:
                return getattr(e, self.mode)
        raise KeyError(op)

    def __contains__(self, op: str) -> bool:
        return any(getattr(e, self.mode) is not None for e in _ENTRIES.get(op, []))

    def __iter__(self) -> Iterator[str]:
        return (op for op in sorted(_ENTRIES) if op in self)


VJP_RULES = _ModeTable("vjp")
JVP_RULES = _ModeTable("jvp")


# --- lookup -----------------------------------------------------------------------------
def operator_version(op: str, opset: int) -> int:
    """The version of ``op`` a model importing ``opset`` uses (its schema's since_version);
    ``opset`` itself for operators onnx does not know."""
    import onnx

    try:
        return onnx.defs.get_schema(op, opset, "").since_version
    except Exception:  # onnx.defs.SchemaError: not an operator of this opset
        return opset


def lookup(op: str, opset: int, domain: str = "") -> list[Entry]:
    """The entries serving ``op`` at the model's ``opset`` (empty: no rule)."""
    if domain not in ("", "ai.onnx") or op not in _ENTRIES:
        return []
    version = operator_version(op, opset)
    return [e for e in _ENTRIES[op] if e.serves(version)]


def entries() -> list[Entry]:
    """Every entry, by operator then version (importing ``rules`` registers them all)."""
    return [e for op in sorted(_ENTRIES) for e in sorted(_ENTRIES[op], key=lambda e: (e.since, e.inputs or ()))]


zero("Shape", "Size", "ArgMax", "ArgMin", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not",
     "And", "Or", "Xor", "IsNaN", "IsInf", "NonZero", "ConstantOfShape", "EyeLike", "RandomNormalLike",
     "RandomUniformLike", "BitShift")
zero("Sign", "Floor", "Ceil", "Round", "Hardmax", piecewise=True)
zero("CastLike", inputs=(1,))  # target_type: only its element type is used


# --- helpers shared by rules ------------------------------------------------------------
def _c(b: Builder, n: Node, value: float) -> str:
    return b.scalar(value, n.dtype)


def _mask(b: Builder, n: Node, condition: str) -> str:
    """A bool condition as 1.0/0.0 in the derivative's dtype. Rules select with masks
    (v * m, or a m + c (1 - m), both exact for finite values) rather than Where, which
    onnxruntime runs several times slower than arithmetic."""
    return b.op("Cast", condition, to=n.dtype)


def _positive(b: Builder, n: Node) -> str:
    """1 where x > 0, else 0."""
    return _mask(b, n, b.op("Greater", n.x, _c(b, n, 0.0)))


def _blend(b: Builder, n: Node, m: str, a: str, c: str) -> str:
    """a where the mask m is 1, c where it is 0."""
    return b.op("Add", b.op("Mul", a, m), b.op("Mul", c, b.op("Sub", _c(b, n, 1.0), m)))


def _broadcast_dims(all_dims: list) -> list | None:
    """Static numpy-broadcast result of several dims lists (None if not all known)."""
    if any(d is None for d in all_dims):
        return None
    rank = max(len(d) for d in all_dims)
    out = []
    for i in range(rank):
        sizes = {d[len(d) - rank + i] for d in all_dims if len(d) - rank + i >= 0} - {1}
        if len(sizes) > 1 or None in sizes:
            return None
        out.append(sizes.pop() if sizes else 1)
    return out
