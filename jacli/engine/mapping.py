"""Which tensor of B is which tensor of A, and in what layout: ``--map A=B[:LAYOUT]``,
names, positions; :class:`Mapped` shows model B under A's names and layouts (B's
per-sample axes transposed on the way in and out), so that every block of B lines up
with A's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..model import Model, TensorSpec
from . import strategies

LAYOUTS = ("nhwc", "nchw")


@dataclass(frozen=True)
class Link:
    """A tensor of A and its counterpart in B: ``how`` is map | name | position; ``layout``
    says how B's per-sample axes lie (``nhwc``: B channels-last where A is channels-first)."""

    a: str
    b: str
    how: str
    layout: str | None = None

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "how": self.how, "layout": self.layout}


def parse_maps(values: Sequence[str]) -> dict[str, tuple[str, str | None]]:
    """``--map A=B[:LAYOUT]`` (repeatable) into {A: (B, LAYOUT or None)}."""
    out = {}
    for text in values:
        a, sep, rest = text.partition("=")
        b, _, layout = rest.rpartition(":") if rest.rsplit(":", 1)[-1].lower() in LAYOUTS else (rest, "", "")
        if not sep or not a or not b:
            raise InputError(f"--map {text!r}: use --map A_NAME=B_NAME or --map A_NAME=B_NAME:nhwc|nchw")
        out[a] = (b, layout.lower() or None)
    return out


def match(a_names: Sequence[str], b_names: Sequence[str], maps: Mapping[str, tuple[str, str | None]], what: str,
          a_all: Sequence[str] | None = None) -> list[Link]:
    """Counterparts in B of ``a_names``: by ``maps``, then by name, then by position (in
    ``a_all``, A's full list, against ``b_names``) when both sides have as many."""
    a_all = list(a_all or a_names)
    links, used = {}, set()
    for a in a_names:
        if a in maps:
            b, layout = maps[a]
            if b not in b_names:
                raise InputError(f"--map {a}={b}: B has no {what} {b!r} (it has: {', '.join(b_names) or 'none'})")
            links[a], used = Link(a, b, "map", layout), used | {b}
    for a in a_names:
        if a not in links and a in b_names and a not in used:
            links[a], used = Link(a, a, "name"), used | {a}
    rest = [a for a in a_names if a not in links]
    if rest:
        if len(a_all) != len(b_names):
            raise InputError(
                f"cannot match A's {what}s ({', '.join(a_all)}) with B's ({', '.join(b_names)}): no such names "
                f"in B and the counts differ; pair them with --map A_NAME=B_NAME")
        for a in rest:
            b = b_names[a_all.index(a)]
            if b in used:
                raise InputError(f"A's {what} {a!r} is at the position of B's {b!r}, which already has a counterpart; "
                                 f"pair them with --map A_NAME=B_NAME")
            links[a], used = Link(a, b, "position"), used | {b}
    return [links[a] for a in a_names]


def layout_perm(layout: str | None, rank: int, name: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(A → B, B → A) permutations of ``rank`` per-sample axes for a layout, or None."""
    if layout is None:
        return None
    if rank < 2:
        raise InputError(f"--map {name}: layout {layout} needs channel and spatial axes, but {name!r} has "
                         f"{rank} per-sample axis(es)")
    last = tuple(range(1, rank)) + (0,)  # channels-first -> channels-last
    first = (rank - 1,) + tuple(range(rank - 1))
    return (last, first) if layout == "nhwc" else (first, last)


def permute(a: np.ndarray, perm: tuple[int, ...] | None) -> np.ndarray:
    """Apply a per-sample permutation to the trailing ``len(perm)`` axes."""
    if perm is None:
        return a
    lead = a.ndim - len(perm)
    return np.ascontiguousarray(a.transpose(*range(lead), *(lead + p for p in perm)))


class Mapped(Model):
    """Model B under A's names and layouts: tensors are renamed and transposed on the way
    in and out of B's own (public) forward, vjp and jvp."""

    def __init__(self, inner: Model, inputs: list[Link], outputs: list[Link]):
        super().__init__(path=inner.path, format=inner.format, backend=inner.backend,
                         supports_ad=inner.supports_ad, ad_unavailable=inner.ad_unavailable)
        self.inner, self.links_in, self.links_out = inner, inputs, outputs
        self.block_bytes = inner.block_bytes
        self._ranks: dict[str, int] = {}  # per-sample rank of each tensor (A's name)
        specs = {s.name: s for s in inner.inputs}
        self.inputs = [TensorSpec(l.a, None, specs[l.b].dtype) for l in inputs]
        out_specs = {s.name: s for s in inner.outputs}
        self.outputs = [TensorSpec(l.a, None, out_specs[l.b].dtype if l.b in out_specs else "float32") for l in outputs]

    def _perm(self, link: Link, to_b: bool):
        perms = layout_perm(link.layout, self._ranks[link.a], link.a)
        return None if perms is None else perms[0 if to_b else 1]

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self.inner.spec(name).dtype)

    def b_inputs(self, xs, leading: int = 0) -> dict[str, np.ndarray]:
        """A's input arrays (or seeds, with ``leading`` extra axes in front) as B's: renamed,
        transposed to B's layout, cast to B's dtypes."""
        out = {}
        for l in self.links_in:
            if l.a in xs:
                self._ranks.setdefault(l.a, xs[l.a].ndim - 1 - leading)
                v = permute(np.asarray(xs[l.a]), self._perm(l, True))
                out[l.b] = v.astype(self._dtype(l.b), copy=False)
        return out

    def _outs(self, ys, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return {l.a: permute(ys[l.b], self._perm(l, False)) for l in self.links_out if names is None or l.a in names}

    def _forward(self, xs):
        return self.forward(xs)

    def bind(self, xs) -> None:
        self.inner.bind(self.b_inputs(xs, 0))

    def forward(self, xs):
        ys = self.inner.forward(self.b_inputs(xs, 0))
        for l in self.links_out:
            if l.b not in ys:
                raise InputError(f"B gave no output {l.b!r} (it gave: {', '.join(ys)})")
            self._ranks.setdefault(l.a, ys[l.b].ndim - 1)
        return self._outs(ys)

    def vjp(self, xs, cotangents, wrt, per_sample=True):
        cts = {}
        for l in self.links_out:
            if l.a in cotangents:
                cts[l.b] = permute(cotangents[l.a], self._perm(l, True))
        b_wrt = [self._b(self.links_in, a) for a in wrt]
        grads = strategies.vjp(self.inner, self.b_inputs(xs, 0), cts, b_wrt, per_sample=per_sample)
        return {l.a: permute(grads[l.b], self._perm(l, False)) for l in self.links_in if l.a in wrt}

    def jvp(self, xs, tangents, of, per_sample=True):
        ts = self.b_inputs(tangents, 1)
        outs = strategies.jvp(self.inner, self.b_inputs(xs, 0), ts, [self._b(self.links_out, a) for a in of],
                              per_sample=per_sample)
        return self._outs(outs, of)

    @staticmethod
    def _b(links: list[Link], a: str) -> str:
        return next(l.b for l in links if l.a == a)


def to_a(link: Link, rank: int):
    perms = layout_perm(link.layout, rank, link.a)
    return None if perms is None else perms[1]


def unpermute_shape(shape: tuple[int, ...], to_a) -> tuple[int, ...]:
    """The shape in B's layout of a tensor whose shape in A's layout is ``shape``."""
    if to_a is None:
        return tuple(shape)
    lead = len(shape) - len(to_a)
    out = list(shape[:lead]) + [0] * len(to_a)
    for j, p in enumerate(to_a):
        out[lead + p] = shape[lead + j]
    return tuple(out)


def check_shapes(plan_a, shapes_b: Mapping[str, tuple[tuple, tuple]], links: dict[str, list[Link]]) -> None:
    """B's per-sample shapes (under A's layout) must be A's."""
    mapped = {l.a: l for ls in links.values() for l in ls}
    for p in plan_a.pairs:
        out_b, in_b = shapes_b[p.key]
        for name, mine, theirs in ((p.of, p.out_shape, out_b), (p.wrt, p.in_shape, in_b)):
            if tuple(mine) != tuple(theirs):
                l = mapped[name]
                hint = "" if l.layout else f"; if B lays it out differently, say so: --map {l.a}={l.b}:nhwc (or :nchw)"
                raise InputError(f"{name!r} has per-sample shape {tuple(mine)} in A but {tuple(theirs)} in B "
                                 f"({l.b!r}){hint}")


def check_inputs(xs: Mapping[str, np.ndarray], links: list[Link], b: Model) -> None:
    """A's input arrays, in B's layout, must fit B's signature (where B declares one)."""
    for l in links:
        spec = b.spec(l.b)
        if spec.shape is None:
            continue
        perms = layout_perm(l.layout, xs[l.a].ndim - 1, l.a)
        shape = unpermute_shape(xs[l.a].shape[1:], None if perms is None else perms[1])
        want = spec.shape[1:]
        if len(want) != len(shape) or any(w is not None and w != s for w, s in zip(want, shape)):
            hint = "" if l.layout else f"; if B lays it out differently, say so: --map {l.a}={l.b}:nhwc (or :nchw)"
            shown = "(" + ", ".join("?" if w is None else str(w) for w in want) + ")"
            raise InputError(f"input {l.a!r} has per-sample shape {tuple(xs[l.a].shape[1:])} in A, but B's {l.b!r} "
                             f"takes {shown}{hint}")
